"""What the docker compose and Kubernetes back-ends share: running an exact argument list
(never a shell), draining through the control endpoint, waiting for ``/health``."""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Any, Callable, Iterable

import httpx

from vllm_otel.mitigate.supervisor.base import RestartBackend, RestartError, RestartRequest
from vllm_otel.mitigate.supervisor.drain import drain_vllm, read_token
from vllm_otel.redact import redact_text

__all__ = ["CommandBackend", "Runner", "run_command"]


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def run_command(runner: Runner, cmd: list[str], timeout_s: float) -> str:
    """Run an argument list (never a shell); stdout, or RestartError with the tail of stderr."""
    try:
        done = runner(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RestartError(f"{cmd[0]} failed: {type(e).__name__}: {e}", 502) from None
    if done.returncode != 0:
        raise RestartError(f"{' '.join(cmd[:4])} ... exited {done.returncode}: "
                           f"{redact_text((done.stderr or '')[-800:])}", 502)
    return done.stdout or ""


class CommandBackend(RestartBackend):
    """The compose and Kubernetes back-ends' shared part: drain, run, wait for health."""

    def __init__(self, *, health_url: str | None, control_url: str | None,
                 control_token_file: str | os.PathLike[str] | None, drain_timeout_s: float,
                 timeout_s: float, allowed_args: Iterable[str], allowed_env: Iterable[str],
                 runner: Runner | None) -> None:
        self.health_url = health_url
        self.control_url = control_url or (re.sub(r"/health$", "", health_url) if health_url else None)
        self.control_token_file = control_token_file
        self.drain_timeout_s = drain_timeout_s
        self.timeout_s = timeout_s
        self.allowed_args = tuple(allowed_args)
        self.allowed_env = tuple(allowed_env)
        self.runner: Runner = runner or subprocess.run

    def _drain(self, req: RestartRequest) -> dict[str, Any]:
        if not req.drain or not self.control_url:
            return {"drained": False, "detail": "not asked" if not req.drain else "no control url"}
        return drain_vllm(self.control_url, read_token(self.control_token_file),
                          self.drain_timeout_s if req.drain_timeout_s is None else req.drain_timeout_s)

    def _wait_healthy(self) -> bool | None:
        if not self.health_url:
            return None
        end = time.monotonic() + self.timeout_s
        while time.monotonic() < end:
            try:
                if httpx.get(self.health_url, timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        return False
