"""Restarts with changed arguments: what only a restart can change in vLLM.

CUDA graphs (``--enforce-eager``), CPU offloading (``--cpu-offload-gb``, ``--kv-offloading-size``),
parallelism (``--tensor-parallel-size``), memory (``--gpu-memory-utilization``), the visible
GPUs and NCCL settings are fixed when vLLM starts. A restart strategy asks a
:class:`RestartBackend` for a new process with a patched argument list; one interface, three
backends:

``ProcessBackend`` (real; what ``vllm-otel supervise -- <vllm command>`` runs)
    owns the vLLM process: starts it in its own process group, restarts it when it dies (with
    exponential backoff, at most ``max_restarts`` within ``restart_window_s``), and restarts it on
    request, gracefully: *drain* (queue limit 0 through vLLM's control endpoint, so new requests
    get 503 and load balancers retry elsewhere; wait until nothing is in flight or the drain
    timeout), SIGTERM to its process group (and SIGCONT, so a stopped engine core can handle it),
    SIGKILL after the grace period, start with the patched argv, wait until ``/health`` answers.
    A new argument list that does not come up is rolled back to the last good one. Only the
    process group it created is ever signalled. Run it under an init (``docker run --init``,
    ``tini``) when it is PID 1 in a container: orphans must be reaped by someone.

``ComposeBackend`` (docker compose)
    reads the service's effective ``command`` and ``environment`` (``docker compose config
    --format json``), writes an override file with the patched ones and runs ``docker compose -f
    <files> -f <override> up -d --no-deps --force-recreate <service>``; with nothing to change,
    ``docker compose restart <service>``. Later ``config`` calls include the override, so changes
    accumulate. Drain goes through the control endpoint as above.

``KubernetesBackend`` (a Deployment)
    reads the Deployment (``kubectl get deployment -o json``), patches the container's ``args``
    (or ``command``) and ``env`` with one JSON patch (``kubectl patch deployment --type=json``),
    which makes the Deployment roll its pods, and waits with ``kubectl rollout status``; with
    nothing to change, ``kubectl rollout restart``. Draining is the Deployment's own job
    (readiness probe, ``preStop``, ``terminationGracePeriodSeconds``, ``maxUnavailable: 0``).

The compose and Kubernetes backends build exact argument lists and run them without a shell.
:class:`HttpSupervisorBackend` is the client side of ``vllm-otel supervise`` (what the
mitigation receiver's actuator uses). Only arguments and environment variables on an allow-list
can be changed (a token holder must not be able to add ``--trust-remote-code`` or a new model).
"""

from __future__ import annotations

import abc
import fnmatch
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field

from vllm_otel.httpread import ANSWER_MAX_BYTES, request_capped_sync
from vllm_otel.redact import REDACTED, is_secret_key, redact_text

__all__ = [
    "patch_args", "get_arg", "has_flag", "normalize_flag", "BOOLEAN_FLAGS",
    "RestartRequest", "RestartError", "RestartBackend", "ProcessBackend", "HttpSupervisorBackend",
    "ComposeBackend", "KubernetesBackend", "drain_vllm", "DEFAULT_ALLOWED_ARGS",
    "DEFAULT_ALLOWED_ENV", "check_allowed", "health_url_for",
]

log = logging.getLogger(__name__)

# --- arguments as data ------------------------------------------------------------------------------
# vLLM's parser accepts --a_b for --a-b and --flag=value for --flag value: one flag here. A token
# after a flag is its value unless it starts with "-" (and is not a negative number) or the flag
# is an on/off flag (BOOLEAN_FLAGS, or set to True): so "--enforce-eager MODEL" keeps its model.
# Tokens after a bare "--" are never touched.

# vLLM's on/off flags that may be patched; their next token is never taken as a value.
BOOLEAN_FLAGS = frozenset({
    "--enforce-eager", "--disable-custom-all-reduce", "--enable-sleep-mode", "--trust-remote-code",
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
    "--no-enable-chunked-prefill", "--disable-log-stats", "--disable-uvicorn-access-log",
    "--enable-log-requests", "--enable-expert-parallel", "--disable-log-requests",
})
# Short spellings vLLM accepts.
ALIASES = {"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size",
           "-dp": "--data-parallel-size"}

_NUMBER = re.compile(r"^-\d")


def normalize_flag(flag: str) -> str:
    """``--gpu_memory_utilization`` -> ``--gpu-memory-utilization``; ``-tp`` -> its long form."""
    if flag in ALIASES:
        return ALIASES[flag]
    if not flag.startswith("--") or len(flag) < 3:
        raise ValueError(f"not a long option: {flag!r}")
    return "--" + flag[2:].replace("_", "-")


def _token_flag(tok: str) -> tuple[str | None, str | None]:
    """(normalized flag, inline value) of a token, or (None, None) for a value / positional."""
    if tok in ALIASES:
        return ALIASES[tok], None
    if not tok.startswith("--") or tok == "--":
        return None, None
    name, eq, value = tok.partition("=")
    return normalize_flag(name), (value if eq else None)


def _is_value(tok: str) -> bool:
    return not tok.startswith("-") or bool(_NUMBER.match(tok))


def _spans(argv: Sequence[str], boolean: Iterable[str] = ()) -> list[tuple[int, int, str | None, str | None]]:
    """(start, end, flag, value) for every token group before a bare ``--``."""
    bools = BOOLEAN_FLAGS | {normalize_flag(b) for b in boolean}
    out = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            break
        flag, inline = _token_flag(tok)
        if flag is None:
            out.append((i, i + 1, None, None))
            i += 1
            continue
        if inline is not None:
            out.append((i, i + 1, flag, inline))
            i += 1
        elif flag not in bools and i + 1 < len(argv) and argv[i + 1] != "--" and _is_value(argv[i + 1]):
            out.append((i, i + 2, flag, argv[i + 1]))
            i += 2
        else:
            out.append((i, i + 1, flag, None))
            i += 1
    return out


def get_arg(argv: Sequence[str], flag: str) -> str | bool | None:
    """The value of ``flag`` (the last one wins, as in argparse); True for a bare flag; None if absent."""
    want = normalize_flag(flag)
    found: str | bool | None = None
    for _, _, f, v in _spans(argv):
        if f == want:
            found = True if v is None else v
    return found


def has_flag(argv: Sequence[str], flag: str) -> bool:
    return get_arg(argv, flag) is not None


def _render(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def patch_args(argv: Sequence[str], set_args: Mapping[str, Any] | None = None,
               remove_args: Iterable[str] = ()) -> list[str]:
    """A new argument list: ``argv`` with flags set and removed. ``argv`` is not modified.

    ``set_args`` maps a flag to: ``True`` (a bare on/off flag, present once; its ``--no-``
    twin removed), ``False`` or ``None`` (removed, with its ``--no-`` twin: vLLM's default
    applies), anything else (``--flag value``: the first occurrence is replaced in place, later
    ones dropped, appended when absent). ``remove_args`` drops every occurrence of each flag with
    its value. Raises ValueError for a flag that is not a long option.
    """
    set_args = {normalize_flag(k): v for k, v in (set_args or {}).items()}
    remove = {normalize_flag(f) for f in remove_args}
    for f in list(remove):
        remove.add(_twin(f))
    for f, v in set_args.items():
        if v is True or v is False or v is None:
            remove.add(_twin(f))
        if v is False or v is None:
            remove.add(f)
    boolean = [f for f, v in set_args.items() if v is True]
    argv = list(argv)
    tail_at = argv.index("--") if "--" in argv else len(argv)
    out: list[str] = []
    done: set[str] = set()
    for start, end, flag, _ in _spans(argv, boolean):
        if flag is None:
            out.extend(argv[start:end])
            continue
        if flag in remove:
            continue
        if flag in set_args:
            if flag in done:
                continue
            done.add(flag)
            v = set_args[flag]
            out.extend([flag] if v is True else [flag, _render(v)])
            continue
        out.extend(argv[start:end])
    for flag, v in set_args.items():
        if flag not in done and v is not False and v is not None:
            out.extend([flag] if v is True else [flag, _render(v)])
    return out + argv[tail_at:]


def _twin(flag: str) -> str:
    """``--enforce-eager`` <-> ``--no-enforce-eager`` (argparse's BooleanOptionalAction)."""
    return "--" + flag[5:] if flag.startswith("--no-") else "--no-" + flag[2:]


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv for display: values of secret-named flags (``--api-key``) and secret shapes hidden."""
    out = list(argv)
    for start, end, flag, value in _spans(argv):
        if flag is not None and value is not None and is_secret_key(flag.lstrip("-")):
            out[end - 1] = (out[end - 1].split("=", 1)[0] + "=" + REDACTED) if end - start == 1 else REDACTED
    return [redact_text(t) for t in out]


# --- what may be changed ----------------------------------------------------------------------------

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


def _visible_env(env: Mapping[str, str], allowed_env: Iterable[str]) -> dict[str, str]:
    """The allow-listed variables only: status output never carries the environment's secrets."""
    pats = list(allowed_env)
    return {k: v for k, v in sorted(env.items()) if any(fnmatch.fnmatchcase(k, p) for p in pats)}


def _apply_env(env: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    out = dict(env)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = str(v)
    return out


def health_url_for(argv: Sequence[str], path: str = "/health") -> str:
    """Where vLLM started with ``argv`` answers: its ``--host`` (loopback for a wildcard) and ``--port``."""
    port = get_arg(argv, "--port")
    host = get_arg(argv, "--host")
    if not isinstance(host, str) or host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port if isinstance(port, str) else 8000}{path}"


# --- draining -------------------------------------------------------------------------------------------

def drain_vllm(base_url: str, token: str | None, timeout_s: float, *, poll_s: float = 0.5,
               client: httpx.Client | None = None) -> dict[str, Any]:
    """Stop admitting (queue limit 0: new requests get 503) and wait until nothing is in flight.

    Needs vLLM's control endpoint (``VLLM_OTEL_CONTROL_TOKEN_FILE``); without it the answer says
    why and the caller restarts undrained. Never raises for vLLM's sake: a drain is best effort.
    """
    t0 = time.monotonic()
    if not token:
        return {"drained": False, "detail": "no control token: vLLM's control endpoint is off", "seconds": 0.0}
    own = client is None
    c = client or httpx.Client(timeout=10.0)
    headers = {"Authorization": f"Bearer {token}"}
    url = base_url.rstrip("/") + "/monitoring/control/"
    in_flight = None
    try:
        r = request_capped_sync(c, "POST", url + "set_queue_limits", max_bytes=ANSWER_MAX_BYTES,
                                json={"max_num_queued_reqs": 0}, headers=headers)
        if r.status_code != 200:
            return {"drained": False, "detail": f"set_queue_limits: HTTP {r.status_code}",
                    "seconds": time.monotonic() - t0}
        while True:
            st = request_capped_sync(c, "POST", url + "status", max_bytes=ANSWER_MAX_BYTES, json={},
                                     headers=headers)
            if st.status_code == 200:
                in_flight = (st.json().get("result") or {}).get("unfinished_requests")
                if in_flight == 0:
                    return {"drained": True, "detail": "nothing in flight", "in_flight": 0,
                            "seconds": time.monotonic() - t0}
            if time.monotonic() - t0 >= timeout_s:
                return {"drained": False, "detail": f"drain timeout ({timeout_s:.0f} s)",
                        "in_flight": in_flight, "seconds": time.monotonic() - t0}
            time.sleep(poll_s)
    except (httpx.HTTPError, ValueError) as e:
        return {"drained": False, "detail": f"control endpoint unreachable: {type(e).__name__}",
                "in_flight": in_flight, "seconds": time.monotonic() - t0}
    finally:
        if own:
            c.close()


def _read_token(path: str | os.PathLike[str] | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


# --- the interface ----------------------------------------------------------------------------------------

class RestartBackend(abc.ABC):
    """Restarts one vLLM deployment with patched arguments. Blocking calls (use a thread from async)."""

    kind: str = "backend"

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """At least ``argv`` (redacted) and ``env`` (allow-listed variables only)."""

    @abc.abstractmethod
    def restart(self, req: RestartRequest) -> dict[str, Any]:
        """Do it and answer with timings; :class:`RestartError` when refused or failed."""


# --- the real one: a process we own ---------------------------------------------------------------------------

class ProcessBackend(RestartBackend):
    """Owns one vLLM process (group); see the module docstring."""

    kind = "process"

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 health_url: str | None = None, control_url: str | None = None,
                 control_token_file: str | os.PathLike[str] | None = None,
                 drain_timeout_s: float = 120.0, stop_grace_s: float = 30.0,
                 start_timeout_s: float = 600.0, max_restarts: int = 5, restart_window_s: float = 600.0,
                 backoff_s: float = 1.0, backoff_max_s: float = 60.0,
                 allowed_args: Iterable[str] = DEFAULT_ALLOWED_ARGS,
                 allowed_env: Iterable[str] = DEFAULT_ALLOWED_ENV,
                 stdout: Any = None, stderr: Any = None) -> None:
        if not argv:
            raise ValueError("no command to supervise")
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.health_url = health_url or health_url_for(self.argv)
        self.control_url = control_url or re.sub(r"/health$", "", self.health_url)
        self.control_token_file = control_token_file
        self.drain_timeout_s = drain_timeout_s
        self.stop_grace_s = stop_grace_s
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.allowed_args = tuple(allowed_args)
        self.allowed_env = tuple(allowed_env)
        self.stdout, self.stderr = stdout, stderr
        self.state = "new"
        self.restarts = 0          # on request
        self.auto_restarts = 0     # after a crash
        self.last_exit_code: int | None = None
        self.started_at: float | None = None
        self.last_restart: dict[str, Any] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()   # process groups we created: the only ones we signal
        self._crashes: list[float] = []
        self._restarting = False
        self._lock = threading.RLock()
        self._restart_lock = threading.Lock()
        self._shutdown = threading.Event()
        self._monitor: threading.Thread | None = None

    # --- process handling -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # A new session makes the child the leader of a new process group (pgid == its pid):
        # vLLM's engine core and workers join it, and only that group is ever signalled.
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=self.stdout, stderr=self.stderr)
        self._groups.add(proc.pid)
        self.started_at = time.time()
        log.warning("supervise: started pid %d: %s", proc.pid, " ".join(redact_argv(argv)))
        return proc

    def _signal(self, pgid: int, sig: int) -> bool:
        if pgid not in self._groups:  # never a group we did not create
            return False
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # the id now belongs to someone else's group: not ours any more
            self._groups.discard(pgid)
            return False

    def _group_alive(self, pgid: int) -> bool:
        return self._signal(pgid, 0)

    def _stop(self, proc: subprocess.Popen[bytes], grace_s: float) -> float:
        """SIGTERM (+SIGCONT) the process group, SIGKILL it after ``grace_s``; seconds taken."""
        t0 = time.monotonic()
        pgid = proc.pid
        self._signal(pgid, signal.SIGTERM)
        self._signal(pgid, signal.SIGCONT)  # a stopped member handles SIGTERM only once continued
        deadline = t0 + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not self._group_alive(pgid):
                break
            time.sleep(0.1)
        else:
            log.warning("supervise: group %d outlived %.0f s of grace: SIGKILL", pgid, grace_s)
            self._signal(pgid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            end = time.monotonic() + 10
            while self._group_alive(pgid) and time.monotonic() < end:
                time.sleep(0.1)
        if proc.poll() is None:
            proc.wait(timeout=5)
        self.last_exit_code = proc.returncode
        if not self._group_alive(pgid):
            self._groups.discard(pgid)
        return time.monotonic() - t0

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return httpx.get(self.health_url, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_healthy(self, proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False, f"exited with code {proc.returncode} while starting"
            if self.healthy():
                return True, "healthy"
            time.sleep(0.25)
        return False, f"{self.health_url} not healthy after {timeout_s:.0f} s"

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, wait: bool = False) -> "ProcessBackend":
        with self._lock:
            self._proc = self._spawn(self.argv, self.env)
            self.state = "starting"
        self._monitor = threading.Thread(target=self._watch, name="vllm-otel-supervise", daemon=True)
        self._monitor.start()
        if wait:
            ok, why = self._wait_healthy(self._proc, self.start_timeout_s)
            if not ok:
                raise RestartError(f"vLLM did not start: {why}")
        return self

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop watching and stop the process group (used on SIGTERM of the supervisor)."""
        self._shutdown.set()
        with self._lock:
            proc, self._proc = self._proc, None
            self.state = "stopping"
        if proc is not None:
            self._stop(proc, self.stop_grace_s if grace_s is None else grace_s)
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        self.state = "stopped"

    def _watch(self) -> None:
        """Marks the process running once healthy; restarts it with backoff when it dies."""
        while not self._shutdown.is_set():
            with self._lock:
                proc, busy = self._proc, self._restarting
            if proc is None or busy:
                self._shutdown.wait(0.2)
                continue
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self.state == "starting" and self.healthy(timeout_s=1.0):
                    with self._lock:
                        if self._proc is proc and not self._restarting:
                            self.state = "running"
                continue
            with self._lock:
                if self._proc is not proc or self._restarting or self._shutdown.is_set():
                    continue  # an intended stop
                now = time.time()
                self.last_exit_code = code
                self._crashes = [t for t in self._crashes if now - t <= self.restart_window_s] + [now]
                if len(self._crashes) > self.max_restarts:
                    log.error("supervise: pid %d exited (%s); %d crashes in %.0f s: giving up",
                              proc.pid, code, len(self._crashes), self.restart_window_s)
                    self.state = "failed"
                    self._proc = None
                    self._cleanup_group(proc.pid)
                    continue
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (len(self._crashes) - 1))
                self.state = "backoff"
                log.warning("supervise: pid %d exited (%s); restarting in %.1f s", proc.pid, code, delay)
            if self._shutdown.wait(delay):
                break
            with self._lock:
                if self._proc is not proc or self._restarting:
                    continue  # a restart on request took over during the backoff
                self._cleanup_group(proc.pid)
                self._proc = self._spawn(self.argv, self.env)
                self.auto_restarts += 1
                self.state = "starting"

    def _cleanup_group(self, pgid: int) -> None:
        """The leader died: its children (engine core, workers) may linger in the group."""
        if self._group_alive(pgid):
            self._signal(pgid, signal.SIGKILL)
            end = time.monotonic() + 10
            while self._group_alive(pgid) and time.monotonic() < end:
                time.sleep(0.1)
        self._groups.discard(pgid)

    # --- the interface ------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": self.kind, "state": self.state, "pid": self.pid,
                    "argv": redact_argv(self.argv), "env": _visible_env(self.env, self.allowed_env),
                    "restarts": self.restarts, "auto_restarts": self.auto_restarts,
                    "last_exit_code": self.last_exit_code, "started_at": self.started_at,
                    "uptime_s": None if self.started_at is None or self.pid is None
                    else round(time.time() - self.started_at, 3),
                    "health_url": self.health_url, "last_restart": self.last_restart}

    def restart(self, req: RestartRequest) -> dict[str, Any]:
        if not self._restart_lock.acquire(blocking=False):
            raise RestartError("a restart is already running", 409)
        try:
            check_allowed(req, self.allowed_args, self.allowed_env)
            try:
                new_argv = patch_args(self.argv, req.set_args, req.remove_args)
            except ValueError as e:
                raise RestartError(str(e), 400) from None
            new_env = _apply_env(self.env, req.env)
            with self._lock:
                self._restarting = True
                proc = self._proc
            return self._restart(proc, new_argv, new_env, req)
        finally:
            with self._lock:
                self._restarting = False
            self._restart_lock.release()

    def _restart(self, proc: subprocess.Popen[bytes] | None, new_argv: list[str], new_env: dict[str, str],
                 req: RestartRequest) -> dict[str, Any]:
        t0 = time.monotonic()
        old_pid = proc.pid if proc is not None and proc.poll() is None else None
        out: dict[str, Any] = {"old_pid": old_pid, "reason": req.reason, "rolled_back": False}
        drain: dict[str, Any] = {"drained": False, "detail": "not asked", "seconds": 0.0}
        if req.drain and old_pid is not None:
            self.state = "draining"
            token = _read_token(self.control_token_file or self.env.get("VLLM_OTEL_CONTROL_TOKEN_FILE")) \
                or self.env.get("VLLM_OTEL_CONTROL_TOKEN")
            drain = drain_vllm(self.control_url, token,
                               self.drain_timeout_s if req.drain_timeout_s is None else req.drain_timeout_s)
        out["drain"] = drain
        self.state = "stopping"
        out["stop_s"] = round(self._stop(proc, self.stop_grace_s), 3) if proc is not None else 0.0
        self.state = "starting"
        t1 = time.monotonic()
        with self._lock:
            new = self._proc = self._spawn(new_argv, new_env)
        ok, why = self._wait_healthy(new, self.start_timeout_s)
        out["start_s"] = round(time.monotonic() - t1, 3)
        if not ok:
            self._stop(new, min(self.stop_grace_s, 10.0))
            out["error"] = why
            changed = new_argv != self.argv or new_env != self.env
            if req.rollback and changed:
                with self._lock:
                    back = self._proc = self._spawn(self.argv, self.env)
                ok2, why2 = self._wait_healthy(back, self.start_timeout_s)
                out.update(rolled_back=ok2, rollback=why2, new_pid=back.pid)
                self.state = "running" if ok2 else "starting"
            else:
                with self._lock:
                    self._proc = None
                self.state = "failed"
            out["total_s"] = round(time.monotonic() - t0, 3)
            self.last_restart = {**out, "ok": False, "at": time.time()}
            raise RestartError(f"the new process did not come up: {why}"
                               + ("; rolled back to the last good arguments" if out["rolled_back"] else ""),
                               502, out)
        with self._lock:
            self.argv, self.env = new_argv, new_env
            self.restarts += 1
            self._crashes.clear()
            self.state = "running"
        out.update(ok=True, new_pid=new.pid, argv=redact_argv(new_argv),
                   env=_visible_env(new_env, self.allowed_env), total_s=round(time.monotonic() - t0, 3))
        self.last_restart = {**out, "at": time.time()}
        log.warning("supervise: restarted (%s): pid %s -> %d in %.1f s", req.reason or "on request",
                    old_pid, new.pid, out["total_s"])
        return out


# --- the client of `vllm-otel supervise` ------------------------------------------------------------------

class HttpSupervisorBackend(RestartBackend):
    """A :class:`ProcessBackend` elsewhere, through its HTTP API (what the actuator calls)."""

    kind = "http"

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 900.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._transport = transport

    def _call(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            with httpx.Client(timeout=timeout_s or self.timeout_s, transport=self._transport) as c:
                r = request_capped_sync(c, method, self.url + path, max_bytes=ANSWER_MAX_BYTES, json=body,
                                        headers=self._headers)
        except httpx.HTTPError as e:
            raise RestartError(f"supervisor {self.url} unreachable: {type(e).__name__}: {e}", 502) from None
        try:
            payload = r.json()
        except ValueError:
            payload = {"error": r.text[:500]}
        if r.status_code != 200:
            raise RestartError(f"supervisor answered HTTP {r.status_code}: "
                               f"{payload.get('error', payload) if isinstance(payload, dict) else payload}",
                               r.status_code, payload.get("data") if isinstance(payload, dict) else None)
        return payload

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status", timeout_s=min(30.0, self.timeout_s))

    def restart(self, req: RestartRequest, timeout_s: float | None = None) -> dict[str, Any]:
        return self._call("POST", "/restart", req.model_dump(mode="json"), timeout_s=timeout_s)


# --- docker compose and Kubernetes: command builders -------------------------------------------------------

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _run(runner: Runner, cmd: list[str], timeout_s: float) -> str:
    """Run an argument list (never a shell); stdout, or RestartError with the tail of stderr."""
    try:
        done = runner(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RestartError(f"{cmd[0]} failed: {type(e).__name__}: {e}", 502) from None
    if done.returncode != 0:
        raise RestartError(f"{' '.join(cmd[:4])} ... exited {done.returncode}: "
                           f"{redact_text((done.stderr or '')[-800:])}", 502)
    return done.stdout or ""


class _CommandBackend(RestartBackend):
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
        return drain_vllm(self.control_url, _read_token(self.control_token_file),
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


class ComposeBackend(_CommandBackend):
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
            "environment": _apply_env({k: "" if v is None else str(v) for k, v in env.items()}, req.env)}}}
        return doc, [self.base_command(with_override=True) + ["up", "-d", "--no-deps", "--force-recreate",
                                                              self.service]]

    def status(self) -> dict[str, Any]:
        config = json.loads(_run(self.runner, self.config_command(), 60.0) or "{}")
        svc = (config.get("services") or {}).get(self.service) or {}
        env = svc.get("environment") or {}
        return {"backend": self.kind, "service": self.service, "argv": redact_argv(svc.get("command") or []),
                "env": _visible_env(env if isinstance(env, dict) else {}, self.allowed_env)}

    def restart(self, req: RestartRequest) -> dict[str, Any]:
        check_allowed(req, self.allowed_args, self.allowed_env)
        t0 = time.monotonic()
        config = json.loads(_run(self.runner, self.config_command(), 60.0) or "{}") if req.changes else {}
        doc, cmds = self.plan(config, req)
        drain = self._drain(req)
        if doc is not None:
            self.override_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        for cmd in cmds:
            _run(self.runner, cmd, self.timeout_s)
        healthy = self._wait_healthy()
        if healthy is False:
            raise RestartError(f"{self.health_url} not healthy after the restart", 502)
        return {"ok": True, "backend": self.kind, "drain": drain, "commands": cmds, "healthy": healthy,
                "argv": redact_argv(doc["services"][self.service]["command"]) if doc else None,
                "total_s": round(time.monotonic() - t0, 3)}


class KubernetesBackend(_CommandBackend):
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
        dep = json.loads(_run(self.runner, self.get_command(), 60.0))
        _, c = self._container(dep)
        env = {e["name"]: e.get("value", "") for e in c.get("env") or [] if "name" in e}
        st = dep.get("status") or {}
        return {"backend": self.kind, "deployment": self.deployment,
                "argv": redact_argv(c.get("args") or c.get("command") or []),
                "env": _visible_env(env, self.allowed_env), "replicas": st.get("replicas"),
                "ready_replicas": st.get("readyReplicas")}

    def restart(self, req: RestartRequest) -> dict[str, Any]:
        check_allowed(req, self.allowed_args, self.allowed_env)
        t0 = time.monotonic()
        dep = json.loads(_run(self.runner, self.get_command(), 60.0)) if req.changes else {}
        cmds = self.plan(dep, req)
        for cmd in cmds:
            _run(self.runner, cmd, self.timeout_s + 30.0)
        return {"ok": True, "backend": self.kind, "commands": cmds,
                "drain": {"drained": None, "detail": "the Deployment's rolling update drains pods"},
                "total_s": round(time.monotonic() - t0, 3)}
