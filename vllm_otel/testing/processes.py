"""Start a process in its own group, wait until it answers, stop the whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import httpx

__all__ = ["ManagedProcess", "free_port", "wait_http", "ProcessFailed", "engine_core_process"]


class ProcessFailed(RuntimeError):
    """The process exited or never became ready; the message carries the end of its log."""


def free_port() -> int:
    """A currently free TCP port on loopback (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True,
              ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200) -> None:
    """Poll ``url`` until ``ok(response)``; give up early when ``alive()`` turns false."""
    deadline = time.monotonic() + timeout_s
    last: str = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise ProcessFailed(f"process exited while waiting for {url}")
        try:
            r = httpx.get(url, timeout=2.0)
            if ok(r):
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.25)
    raise ProcessFailed(f"{url} not ready after {timeout_s:.0f} s (last: {last})")


class ManagedProcess:
    """A child process in a new session (own process group), output to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-chars:].decode("utf-8", "replace")

    def wait_log(self, text: str, *, timeout_s: float, poll_s: float = 0.02) -> None:
        """Until ``text`` shows in the log (a server that logs it when ready, e.g. uvicorn's
        "Application startup complete" for a socket it was handed, where /healthz would be
        answered by another process on the same port)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_tail():
            if not self.alive():
                raise ProcessFailed(f"{self.name} exited before logging {text!r}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} did not log {text!r} within {timeout_s:.0f} s:\n"
                                    f"{self.log_tail()}")
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the group, then SIGKILL the group if it lingers. Only our own group is touched."""
        if self.proc is None:
            return
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None and pgid == self.proc.pid:  # never signal a group we did not create
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    # Children (vLLM's engine core, workers) may outlive the leader briefly.
                    deadline = time.monotonic() + wait
                    while time.monotonic() < deadline:
                        try:
                            os.killpg(pgid, 0)
                        except ProcessLookupError:
                            break
                        time.sleep(0.1)
                    else:
                        continue
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.proc = None
        self._log.close()

    def __enter__(self) -> "ManagedProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def engine_core_process(pid: int):  # -> psutil.Process (imported lazily)
    """vLLM's engine-core child of the server process ``pid`` (for SIGSTOP fault injection).

    Found among the server's own descendants by its process title, never system-wide. A process
    forked by the engine core inherits its title until it sets its own, so the one whose parent
    is not an engine core is the engine core.
    """
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    pids = {c.pid for c in found}
    for child in found:
        try:
            if child.ppid() not in pids:
                return child
        except psutil.Error:
            continue
    raise ProcessFailed(f"no vLLM engine-core process under pid {pid}")
