"""What every restart back-end shares: the request, its error, the allow-lists of what a
restart may change (a token holder must not be able to add ``--trust-remote-code`` or a new
model), and the :class:`RestartBackend` interface."""

from __future__ import annotations

import abc
import fnmatch
import re
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from vllm_otel.mitigate.supervisor.args import normalize_flag

__all__ = ["RestartBackend", "RestartRequest", "RestartError", "check_allowed", "visible_env",
           "apply_env", "DEFAULT_ALLOWED_ARGS", "DEFAULT_ALLOWED_ENV"]


DEFAULT_ALLOWED_ARGS = (
    "--enforce-eager", "--gpu-memory-utilization", "--cpu-offload-gb", "--kv-offloading-size",
    "--kv-offloading-backend", "--tensor-parallel-size", "--pipeline-parallel-size",
    "--data-parallel-size", "--max-num-seqs", "--max-num-batched-tokens", "--max-model-len",
    "--disable-custom-all-reduce", "--swap-space", "--num-gpu-blocks-override", "--kv-cache-dtype",
    "--enable-sleep-mode", "--enable-chunked-prefill", "--block-size", "--max-num-partial-prefills",
)
DEFAULT_ALLOWED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NCCL_*", "TORCH_NCCL_*",
                       "PYTORCH_CUDA_ALLOC_CONF", "VLLM_CPU_KVCACHE_SPACE")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RestartError(RuntimeError):
    """A restart was refused or failed. ``status``: 400 bad request, 409 busy / not possible,
    502 the new process did not come up (``data`` says what happened, rollback included)."""

    def __init__(self, message: str, status: int = 502, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.data = dict(data or {})


class RestartRequest(BaseModel):
    """One restart: what changes, and whether to drain first."""

    model_config = ConfigDict(extra="forbid")

    drain: bool = Field(True, description="stop admitting and wait for in-flight requests first")
    drain_timeout_s: float | None = Field(None, ge=0.0, le=3600.0)
    set_args: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    remove_args: list[str] = Field(default_factory=list)
    env: dict[str, str | None] = Field(default_factory=dict, description="None unsets a variable")
    rollback: bool = Field(True, description="start the last good arguments when the new ones fail")
    reason: str = Field("", max_length=2000)

    @property
    def changes(self) -> bool:
        return bool(self.set_args or self.remove_args or self.env)


def check_allowed(req: RestartRequest, allowed_args: Iterable[str], allowed_env: Iterable[str]) -> None:
    """RestartError(400) naming every flag or variable that is not on the allow-lists."""
    allowed = {normalize_flag(a) for a in allowed_args}
    bad = []
    for flag in [*req.set_args, *req.remove_args]:
        try:
            f = normalize_flag(flag)
        except ValueError as e:
            bad.append(str(e))
            continue
        if f not in allowed and not (f.startswith("--no-") and "--" + f[5:] in allowed):
            bad.append(f"argument {flag} is not on the allow-list")
    pats = list(allowed_env)
    for name in req.env:
        if not _ENV_NAME.match(name):
            bad.append(f"bad environment variable name {name!r}")
        elif not any(fnmatch.fnmatchcase(name, p) for p in pats):
            bad.append(f"environment variable {name} is not on the allow-list")
    if bad:
        raise RestartError("; ".join(bad), 400)


def visible_env(env: Mapping[str, str], allowed_env: Iterable[str]) -> dict[str, str]:
    """The allow-listed variables only: status output never carries the environment's secrets."""
    pats = list(allowed_env)
    return {k: v for k, v in sorted(env.items()) if any(fnmatch.fnmatchcase(k, p) for p in pats)}


def apply_env(env: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    out = dict(env)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = str(v)
    return out


class RestartBackend(abc.ABC):
    """Restarts one vLLM deployment with patched arguments. Blocking calls (use a thread from async)."""

    kind: str = "backend"

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """At least ``argv`` (redacted) and ``env`` (allow-listed variables only)."""

    @abc.abstractmethod
    def restart(self, req: RestartRequest) -> dict[str, Any]:
        """Do it and answer with timings; :class:`RestartError` when refused or failed."""
