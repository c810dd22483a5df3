"""``KubernetesBackend``: a Deployment.

Reads the Deployment (``kubectl get deployment -o json``), patches the container's ``args``
(or ``command``) and ``env`` with one JSON patch (``kubectl patch deployment --type=json``),
which makes the Deployment roll its pods, and waits with ``kubectl rollout status``; with
nothing to change, ``kubectl rollout restart``. Draining is the Deployment's own job
(readiness probe, ``preStop``, ``terminationGracePeriodSeconds``, ``maxUnavailable: 0``)."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Mapping, Sequence

from vllm_otel.mitigate.supervisor.args import patch_args, redact_argv
from vllm_otel.mitigate.supervisor.base import (DEFAULT_ALLOWED_ARGS, DEFAULT_ALLOWED_ENV, RestartError,
                                                RestartRequest, check_allowed, visible_env)
from vllm_otel.mitigate.supervisor.command import CommandBackend, Runner, run_command

__all__ = ["KubernetesBackend"]


class KubernetesBackend(CommandBackend):
    """A Deployment's container (see the module docstring). Tested by the commands it builds."""

    kind = "kubernetes"

    def __init__(self, namespace: str, deployment: str, *, container: str | None = None,
                 context: str | None = None, kubectl: Sequence[str] = ("kubectl",),
                 timeout_s: float = 900.0, allowed_args: Iterable[str] = DEFAULT_ALLOWED_ARGS,
                 allowed_env: Iterable[str] = DEFAULT_ALLOWED_ENV, runner: Runner | None = None) -> None:
        super().__init__(health_url=None, control_url=None, control_token_file=None, drain_timeout_s=0.0,
                         timeout_s=timeout_s, allowed_args=allowed_args, allowed_env=allowed_env,
                         runner=runner)
        self.namespace, self.deployment, self.container = namespace, deployment, container
        self.context = context
        self.kubectl = list(kubectl)

    def base_command(self) -> list[str]:
        return [*self.kubectl, *(["--context", self.context] if self.context else []), "-n", self.namespace]

    def get_command(self) -> list[str]:
        return self.base_command() + ["get", "deployment", self.deployment, "-o", "json"]

    def _container(self, deployment: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        containers = deployment["spec"]["template"]["spec"]["containers"]
        for i, c in enumerate(containers):
            if self.container is None or c.get("name") == self.container:
                return i, c
        raise RestartError(f"container {self.container!r} not in deployment {self.deployment}", 409)

    def plan(self, deployment: Mapping[str, Any], req: RestartRequest) -> list[list[str]]:
        """The commands for ``req``: one JSON patch (args/command + env) or a rollout restart,
        then a rollout status wait."""
        name = f"deployment/{self.deployment}"
        wait = self.base_command() + ["rollout", "status", name, f"--timeout={int(self.timeout_s)}s"]
        if not req.changes:
            return [self.base_command() + ["rollout", "restart", name], wait]
        i, c = self._container(deployment)
        field = "args" if c.get("args") or not c.get("command") else "command"
        current = c.get(field)
        if not current:
            raise RestartError(f"container {c.get('name')} has no args or command to patch", 409)
        path = f"/spec/template/spec/containers/{i}"
        ops: list[dict[str, Any]] = [{"op": "replace", "path": f"{path}/{field}",
                                      "value": patch_args(current, req.set_args, req.remove_args)}]
        if req.env:
            env = [dict(e) for e in c.get("env") or []]
            for k, v in req.env.items():
                env = [e for e in env if e.get("name") != k]
                if v is not None:
                    env.append({"name": k, "value": str(v)})
            ops.append({"op": "replace" if "env" in c else "add", "path": f"{path}/env", "value": env})
        patch = self.base_command() + ["patch", "deployment", self.deployment, "--type=json",
                                       "-p", json.dumps(ops, separators=(",", ":"))]
        return [patch, wait]

    def status(self) -> dict[str, Any]:
        dep = json.loads(run_command(self.runner, self.get_command(), 60.0))
        _, c = self._container(dep)
        env = {e["name"]: e.get("value", "") for e in c.get("env") or [] if "name" in e}
        st = dep.get("status") or {}
        return {"backend": self.kind, "deployment": self.deployment,
                "argv": redact_argv(c.get("args") or c.get("command") or []),
                "env": visible_env(env, self.allowed_env), "replicas": st.get("replicas"),
                "ready_replicas": st.get("readyReplicas")}

    def restart(self, req: RestartRequest) -> dict[str, Any]:
        check_allowed(req, self.allowed_args, self.allowed_env)
        t0 = time.monotonic()
        dep = json.loads(run_command(self.runner, self.get_command(), 60.0)) if req.changes else {}
        cmds = self.plan(dep, req)
        for cmd in cmds:
            run_command(self.runner, cmd, self.timeout_s + 30.0)
        return {"ok": True, "backend": self.kind, "commands": cmds,
                "drain": {"drained": None, "detail": "the Deployment's rolling update drains pods"},
                "total_s": round(time.monotonic() - t0, 3)}
