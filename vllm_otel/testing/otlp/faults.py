"""Failure injection, to prove that a down, failing or slow collector never slows the exporter's host.

* :meth:`~FaultInjection.set_status` -- reject exports (default HTTP 503 / gRPC ``UNAVAILABLE``),
  optionally with a ``Retry-After`` / ``RetryInfo`` hint, only for some signals or only N times;
* :meth:`~FaultInjection.set_delay` -- answer every export only after a delay (a slow collector);
* :meth:`~FaultInjection.pause` / :meth:`~FaultInjection.resume` -- hold every export without
  answering (a hung collector) until resumed;
* :meth:`~FaultInjection.require_headers` -- reject exports lacking some headers (HTTP 401 / gRPC
  ``UNAUTHENTICATED``).

Going down and coming back (``stop()`` then ``start()``) is the receiver's lifecycle, see
:mod:`vllm_otel.testing.otlp.receiver`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import grpc

from vllm_otel.testing.otlp.wire import SIGNALS

if TYPE_CHECKING:
    from vllm_otel.testing.otlp.receiver import RunState

__all__ = ["Failure", "FaultInjection", "HTTP_TO_GRPC"]

HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass
class Failure:
    """How one export is answered instead of being accepted."""

    http_status: int
    grpc_code: grpc.StatusCode
    message: str
    retry_after_s: float | None
    signals: frozenset[str]
    remaining: int | None       # None: until set_status(None)


class FaultInjection:
    """The failure settings of one receiver and the verdict on each export (both transports)."""

    def __init__(self) -> None:
        self._fault_lock = threading.Lock()
        self._failure: Failure | None = None
        self._delay_s = 0.0
        self._required_headers: dict[str, str] = {}
        self._resumed = threading.Event()
        self._resumed.set()

    def set_status(self, code: int | grpc.StatusCode | None = 503, *, message: str = "injected failure",
                   retry_after_s: float | None = None, signals: Iterable[str] | None = None,
                   times: int | None = None) -> None:
        """Make exports fail (``None``, 200 or ``grpc.StatusCode.OK``: succeed again).

        ``code`` is an HTTP status (mapped to gRPC: 503 -> UNAVAILABLE, 429 -> RESOURCE_EXHAUSTED,
        400 -> INVALID_ARGUMENT, ...) or a ``grpc.StatusCode`` (mapped back to HTTP). Rejected
        exports are not stored but counted (:meth:`rejected_count`, :meth:`attempts`).
        ``retry_after_s`` sends ``Retry-After`` (HTTP) / ``google.rpc.RetryInfo`` (gRPC), which the
        OTel exporters honour as their retry backoff. ``signals`` limits the failure to some of
        ``traces``/``metrics``/``logs``; ``times`` reverts to success after that many rejections.
        """
        if code is None or code == 200 or code == grpc.StatusCode.OK:
            failure = None
        elif isinstance(code, grpc.StatusCode):
            failure = Failure(_GRPC_TO_HTTP.get(code, 500), code, message, retry_after_s,
                              frozenset(signals or SIGNALS), times)
        else:
            code = int(code)
            if not 400 <= code <= 599:
                raise ValueError(f"HTTP failure status must be 4xx/5xx, got {code}")
            failure = Failure(code, HTTP_TO_GRPC.get(code, grpc.StatusCode.UNKNOWN), message,
                              retry_after_s, frozenset(signals or SIGNALS), times)
        if failure is not None and not failure.signals <= set(SIGNALS):
            raise ValueError(f"unknown signal(s) {set(failure.signals) - set(SIGNALS)}")
        with self._fault_lock:
            self._failure = failure

    def set_delay(self, seconds: float) -> None:
        """Answer each export only after ``seconds`` (0 disables). stop() cuts waiting exports."""
        with self._fault_lock:
            self._delay_s = max(0.0, float(seconds))

    def pause(self) -> None:
        """Hold every export (accepted, never answered) until :meth:`resume` or :meth:`stop`."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def require_headers(self, headers: Mapping[str, str] | None) -> None:
        """Reject exports lacking these headers/metadata (HTTP 401 / gRPC UNAUTHENTICATED)."""
        with self._fault_lock:
            self._required_headers = {k.lower(): v for k, v in (headers or {}).items()}

    # ---- request handling (shared by both transports) ---------------------------------------

    def _hold(self, run: RunState) -> bool:
        """Apply pause()/set_delay(). False when the run is stopping meanwhile."""
        while not self._resumed.is_set():
            if run.stopping.is_set():
                return False
            self._resumed.wait(0.05)
        with self._fault_lock:
            delay = self._delay_s
        if delay > 0 and run.stopping.wait(delay):
            return False
        return not run.stopping.is_set()

    def _verdict(self, signal: str, headers: dict[str, str]) -> Failure | None:
        """Decide, under the lock, whether this export is rejected (and consume a ``times`` use)."""
        with self._fault_lock:
            for k, v in self._required_headers.items():
                if headers.get(k) != v:
                    return Failure(401, grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong header {k!r}",
                                   None, frozenset(SIGNALS), None)
            f = self._failure
            if f is None or signal not in f.signals:
                return None
            if f.remaining is not None:
                f.remaining -= 1
                if f.remaining <= 0:
                    self._failure = None
            return f
