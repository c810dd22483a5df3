"""``ComposeBackend``: a docker compose service.

Reads the service's effective ``command`` and ``environment`` (``docker compose config
--format json``), writes an override file with the patched ones and runs ``docker compose -f
<files> -f <override> up -d --no-deps --force-recreate <service>``; with nothing to change,
``docker compose restart <service>``. Later ``config`` calls include the override, so changes
accumulate. Drain goes through vLLM's control endpoint."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from vllm_otel.mitigate.supervisor.args import patch_args, redact_argv
from vllm_otel.mitigate.supervisor.base import (DEFAULT_ALLOWED_ARGS, DEFAULT_ALLOWED_ENV, RestartError,
                                                RestartRequest, apply_env, check_allowed, visible_env)
from vllm_otel.mitigate.supervisor.command import CommandBackend, Runner, run_command

__all__ = ["ComposeBackend"]


class ComposeBackend(CommandBackend):
    """A docker compose service (see the module docstring). Tested by the commands it builds."""

    kind = "compose"

    def __init__(self, project_dir: str | os.PathLike[str], service: str, *, files: Sequence[str] = (),
                 override_file: str | os.PathLike[str] | None = None,
                 compose: Sequence[str] = ("docker", "compose"), health_url: str | None = None,
                 control_url: str | None = None, control_token_file: str | os.PathLike[str] | None = None,
                 drain_timeout_s: float = 120.0, timeout_s: float = 900.0,
                 allowed_args: Iterable[str] = DEFAULT_ALLOWED_ARGS,
                 allowed_env: Iterable[str] = DEFAULT_ALLOWED_ENV, runner: Runner | None = None) -> None:
        super().__init__(health_url=health_url, control_url=control_url,
                         control_token_file=control_token_file, drain_timeout_s=drain_timeout_s,
                         timeout_s=timeout_s, allowed_args=allowed_args, allowed_env=allowed_env,
                         runner=runner)
        self.project_dir = Path(project_dir)
        self.service = service
        self.files = list(files)
        self.override_file = Path(override_file) if override_file else \
            self.project_dir / f"vllm-otel.{service}.override.yml"
        self.compose = list(compose)

    def base_command(self, with_override: bool | None = None) -> list[str]:
        if with_override is None:
            with_override = self.override_file.exists()
        cmd = [*self.compose, "--project-directory", str(self.project_dir)]
        for f in self.files + ([str(self.override_file)] if with_override else []):
            cmd += ["-f", f]
        return cmd

    def config_command(self) -> list[str]:
        return self.base_command() + ["config", "--format", "json"]

    def plan(self, config: Mapping[str, Any], req: RestartRequest) -> tuple[dict[str, Any] | None, list[list[str]]]:
        """(override document to write or None, commands to run) for ``req``, from the merged config."""
        if not req.changes:
            return None, [self.base_command() + ["restart", self.service]]
        svc = (config.get("services") or {}).get(self.service)
        if svc is None:
            raise RestartError(f"compose service {self.service!r} not found", 409)
        command = svc.get("command")
        if isinstance(command, str):
            command = command.split()
        if not command:
            raise RestartError(f"service {self.service!r} has no command to patch: write vLLM's "
                               "arguments under `command:` in the compose file", 409)
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
        doc = {"services": {self.service: {
            "command": patch_args(command, req.set_args, req.remove_args),
            "environment": apply_env({k: "" if v is None else str(v) for k, v in env.items()}, req.env)}}}
        return doc, [self.base_command(with_override=True) + ["up", "-d", "--no-deps", "--force-recreate",
                                                              self.service]]

    def status(self) -> dict[str, Any]:
        config = json.loads(run_command(self.runner, self.config_command(), 60.0) or "{}")
        svc = (config.get("services") or {}).get(self.service) or {}
        env = svc.get("environment") or {}
        return {"backend": self.kind, "service": self.service, "argv": redact_argv(svc.get("command") or []),
                "env": visible_env(env if isinstance(env, dict) else {}, self.allowed_env)}

    def restart(self, req: RestartRequest) -> dict[str, Any]:
        check_allowed(req, self.allowed_args, self.allowed_env)
        t0 = time.monotonic()
        config = json.loads(run_command(self.runner, self.config_command(), 60.0) or "{}") if req.changes else {}
        doc, cmds = self.plan(config, req)
        drain = self._drain(req)
        if doc is not None:
            self.override_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        for cmd in cmds:
            run_command(self.runner, cmd, self.timeout_s)
        healthy = self._wait_healthy()
        if healthy is False:
            raise RestartError(f"{self.health_url} not healthy after the restart", 502)
        return {"ok": True, "backend": self.kind, "drain": drain, "commands": cmds, "healthy": healthy,
                "argv": redact_argv(doc["services"][self.service]["command"]) if doc else None,
                "total_s": round(time.monotonic() - t0, 3)}
