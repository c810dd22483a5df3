"""``ProcessBackend``: the vLLM process that ``vllm-otel supervise`` owns.

Starts it in its own process group, restarts it when it dies (exponential backoff, at most
``max_restarts`` within ``restart_window_s``) and on request: drain, SIGTERM to its group
(with SIGCONT, so a stopped engine core can handle it), SIGKILL after the grace period, start
with the patched argv, wait for ``/health``; a new argv that does not come up is rolled back.
Only the process groups it created are ever signalled."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from typing import Any, Iterable, Mapping, Sequence

import httpx

from vllm_otel.mitigate.supervisor.args import health_url_for, patch_args, redact_argv
from vllm_otel.mitigate.supervisor.base import (DEFAULT_ALLOWED_ARGS, DEFAULT_ALLOWED_ENV, RestartBackend,
                                                RestartError, RestartRequest, apply_env, check_allowed,
                                                visible_env)
from vllm_otel.mitigate.supervisor.drain import drain_vllm, read_token

__all__ = ["ProcessBackend"]

log = logging.getLogger(__name__)


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
                    "argv": redact_argv(self.argv), "env": visible_env(self.env, self.allowed_env),
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
            new_env = apply_env(self.env, req.env)
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
            token = read_token(self.control_token_file or self.env.get("VLLM_OTEL_CONTROL_TOKEN_FILE")) \
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
                   env=visible_env(new_env, self.allowed_env), total_s=round(time.monotonic() - t0, 3))
        self.last_restart = {**out, "at": time.time()}
        log.warning("supervise: restarted (%s): pid %s -> %d in %.1f s", req.reason or "on request",
                    old_pid, new.pid, out["total_s"])
        return out
