"""Unit tests run no services: a test here that starts a process or listens on a socket fails,
so whatever needs a real vLLM, Prometheus, Alertmanager, PostgreSQL or a server lives in
``tests/integration/`` and the unit tests stay a few seconds each."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest


class StartedAService(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_services(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def popen(self: object, args: object, *a: object, **k: object) -> None:
        argv = [args] if isinstance(args, str) else list(args)  # type: ignore[call-overload]
        # The platform module probes the host with `file` and `uname` (architecture, processor),
        # once for whichever test asks first: a query, not a service.
        if argv and argv[0] in ("file", "uname"):
            return real_init(self, args, *a, **k)
        raise StartedAService(f"a unit test started a process ({args!r}): move it to tests/integration/")

    def bind(self: socket.socket, address: object) -> None:
        raise StartedAService(f"a unit test listened on {address!r}: move it to tests/integration/")

    real_init = subprocess.Popen.__init__
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(socket.socket, "bind", bind)
    yield
