"""What a receiver got: the stored export requests, and the queries and waits tests use on them.

Everything received is stored (bounded by ``max_items`` spans + data points + log records) as the
decoded protobuf request, together with the request headers / gRPC metadata. Accessors flatten the
protos into plain Python dicts (:meth:`ReceivedExports.spans`, :meth:`~ReceivedExports.metrics`,
:meth:`~ReceivedExports.logs`, see :mod:`vllm_otel.testing.otlp.flatten` for the keys) and
``wait_for_*`` block on a condition variable until what a test expects has arrived (or raise
``TimeoutError`` saying what did arrive).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from google.protobuf.message import Message

from vllm_otel.testing.otlp.flatten import FLATTENERS
from vllm_otel.testing.otlp.wire import SIGNALS

__all__ = ["ReceivedRequest", "ExportAttempt", "ReceivedExports"]


@dataclass
class ReceivedRequest:
    """One accepted export request, as decoded from the wire."""

    signal: str                 # "traces" | "metrics" | "logs"
    transport: str              # "grpc" | "http"
    request: Message            # the ExportXServiceRequest proto
    headers: dict[str, str]     # lower-cased HTTP headers or gRPC invocation metadata
    time: float                 # time.time() when it was accepted
    items: int                  # spans / metric data points / log records in it
    encoding: str = "protobuf"  # "protobuf" | "json"
    compression: str = "none"   # HTTP Content-Encoding ("gzip", "deflate", "none"); gRPC: "none"
    seq: int = -1               # arrival order, unique per receiver
    _flat: list[dict[str, Any]] | None = field(default=None, repr=False)

    def flat(self) -> list[dict[str, Any]]:
        """The request's items flattened to plain dicts (cached and shared: do not mutate them)."""
        if self._flat is None:
            items = FLATTENERS[self.signal](self.request)
            for it in items:
                it["transport"] = self.transport
            self._flat = items
        return self._flat


@dataclass(frozen=True)
class ExportAttempt:
    """Every export call the receiver saw, accepted or not."""

    signal: str
    transport: str
    accepted: bool
    status: int | str           # HTTP status code, or gRPC status code name ("OK", "UNAVAILABLE")
    headers: dict[str, str]
    time: float


class ReceivedExports:
    """The accepted requests and every export call seen, bounded by ``max_items``; thread-safe."""

    def __init__(self, max_items: int = 100_000) -> None:
        self.max_items = max_items
        self._cond = threading.Condition()
        self._gen = 0
        self._seq = 0
        self._epoch = 0  # bumped by clear()
        self._records: deque[ReceivedRequest] = deque()
        self._attempts: deque[ExportAttempt] = deque(maxlen=max(1, max_items))
        self._items = 0
        self._dropped_items = 0
        self._bad_requests = 0
        self._counts: dict[tuple[str, str, bool], int] = {}

    # ---- recording (called by the transports) -----------------------------------------------

    def _record_attempt(self, signal: str, transport: str, accepted: bool, status: int | str,
                        headers: dict[str, str], request: ReceivedRequest | None = None) -> None:
        with self._cond:
            self._attempts.append(ExportAttempt(signal, transport, accepted, status, headers, time.time()))
            key = (signal, transport, accepted)
            self._counts[key] = self._counts.get(key, 0) + 1
            if request is not None:
                request.seq = self._seq
                self._seq += 1
                self._records.append(request)
                self._items += request.items
                while self._items > self.max_items and len(self._records) > 1:
                    old = self._records.popleft()
                    self._items -= old.items
                    self._dropped_items += old.items
            self._gen += 1
            self._cond.notify_all()

    def _record_bad_request(self) -> None:
        with self._cond:
            self._bad_requests += 1
            self._gen += 1
            self._cond.notify_all()

    # ---- raw access -------------------------------------------------------------------------

    def requests(self, signal: str | None = None) -> list[ReceivedRequest]:
        """Accepted export requests (oldest first), optionally of one signal."""
        with self._cond:
            recs = list(self._records)
        return [r for r in recs if signal is None or r.signal == signal]

    def attempts(self, signal: str | None = None) -> list[ExportAttempt]:
        """Every export call seen (accepted and rejected), oldest first."""
        with self._cond:
            atts = list(self._attempts)
        return [a for a in atts if signal is None or a.signal == signal]

    def headers(self, signal: str | None = None, *, accepted_only: bool = False) -> list[dict[str, str]]:
        """Lower-cased headers (HTTP) / invocation metadata (gRPC) of each export call seen."""
        return [a.headers for a in self.attempts(signal) if a.accepted or not accepted_only]

    def _count(self, accepted: bool, signal: str | None, transport: str | None) -> int:
        with self._cond:
            return sum(n for (s, t, a), n in self._counts.items()
                       if a == accepted and (signal is None or s == signal)
                       and (transport is None or t == transport))

    def accepted_count(self, signal: str | None = None, transport: str | None = None) -> int:
        return self._count(True, signal, transport)

    def rejected_count(self, signal: str | None = None, transport: str | None = None) -> int:
        """Export calls answered with an error by set_status()/require_headers()."""
        return self._count(False, signal, transport)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            by_signal: dict[str, dict[str, int]] = {s: {"accepted": 0, "rejected": 0} for s in SIGNALS}
            for (s, _t, a), n in self._counts.items():
                by_signal[s]["accepted" if a else "rejected"] += n
            return {
                "accepted": sum(v["accepted"] for v in by_signal.values()),
                "rejected": sum(v["rejected"] for v in by_signal.values()),
                "by_signal": by_signal,
                "stored_requests": len(self._records),
                "stored_items": self._items,
                "dropped_items": self._dropped_items,
                "bad_requests": self._bad_requests,
            }

    def clear(self) -> None:
        """Forget everything received and all counters (failure/delay settings stay)."""
        with self._cond:
            self._records.clear()
            self._attempts.clear()
            self._counts.clear()
            self._items = self._dropped_items = self._bad_requests = 0
            self._epoch += 1
            self._gen += 1
            self._cond.notify_all()

    # ---- flattened accessors ----------------------------------------------------------------

    def _items_of(self, signal: str, name: str | None = None) -> list[dict[str, Any]]:
        return [it for r in self.requests(signal) for it in r.flat() if name is None or it.get("name") == name]

    def spans(self, name: str | None = None) -> list[dict[str, Any]]:
        """Received spans, flattened (keys: see :mod:`vllm_otel.testing.otlp.flatten`)."""
        return self._items_of("traces", name)

    def metrics(self, name: str | None = None) -> list[dict[str, Any]]:
        """Received metric data points (one dict per point), flattened."""
        return self._items_of("metrics", name)

    def logs(self) -> list[dict[str, Any]]:
        return self._items_of("logs")

    def metric_names(self) -> set[str]:
        return {m["name"] for m in self.metrics()}

    def span_names(self) -> set[str]:
        return {s["name"] for s in self.spans()}

    # ---- waiting ----------------------------------------------------------------------------

    def wait_until(self, condition: Callable[["ReceivedExports"], Any], timeout_s: float = 10.0) -> Any:
        """Block until ``condition(self)`` is truthy (re-checked on every export); return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                gen = self._gen
            result = condition(self)
            if result:
                return result
            with self._cond:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout_s}s; {self._summary_locked()}")
                if self._gen == gen:
                    self._cond.wait(remaining)

    def _wait_items(self, signal: str, predicate: Callable[[dict[str, Any]], Any] | None, count: int,
                    timeout_s: float, what: str) -> list[dict[str, Any]]:
        # Incremental: each wake-up only scans requests that arrived since the last scan.
        deadline = time.monotonic() + timeout_s
        found: list[dict[str, Any]] = []
        last_seq, epoch = -1, None
        while True:
            with self._cond:
                gen = self._gen
                if epoch != self._epoch:  # first pass, or clear() happened: start over
                    epoch, found, last_seq = self._epoch, [], -1
                new: list[ReceivedRequest] = []
                for rec in reversed(self._records):
                    if rec.seq <= last_seq:
                        break
                    new.append(rec)
            for rec in reversed(new):
                if rec.signal == signal:
                    found.extend(it for it in rec.flat() if _match(predicate, it))
            if new:
                last_seq = new[0].seq
            if len(found) >= count:
                return found
            with self._cond:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._gen == gen:
                    self._cond.wait(remaining)
        seen = self._items_of(signal)
        names = sorted({str(it.get("name")) for it in seen})[:40] if signal != "logs" else []
        raise TimeoutError(f"waited {timeout_s}s for {count} {what} matching the predicate, found {len(found)}; "
                           f"received {len(seen)} {what} (names: {names}); {self._summary()}")

    def wait_for_spans(self, predicate: Callable[[dict[str, Any]], Any] | None = None,
                       timeout_s: float = 10.0, *, count: int = 1) -> list[dict[str, Any]]:
        """Block until at least ``count`` spans satisfy ``predicate``; return all matching spans.

        A predicate raising ``KeyError``/``IndexError`` counts as no match. Raises ``TimeoutError``.
        """
        return self._wait_items("traces", predicate, count, timeout_s, "spans")

    def wait_for_metrics(self, predicate: Callable[[dict[str, Any]], Any] | None = None,
                         timeout_s: float = 10.0, *, count: int = 1) -> list[dict[str, Any]]:
        """Block until at least ``count`` metric data points satisfy ``predicate``; return them."""
        return self._wait_items("metrics", predicate, count, timeout_s, "data points")

    def wait_for_logs(self, predicate: Callable[[dict[str, Any]], Any] | None = None,
                      timeout_s: float = 10.0, *, count: int = 1) -> list[dict[str, Any]]:
        return self._wait_items("logs", predicate, count, timeout_s, "log records")

    def wait_for_attempts(self, count: int = 1, timeout_s: float = 10.0, *, signal: str | None = None,
                          accepted: bool | None = None) -> list[ExportAttempt]:
        """Block until ``count`` export calls (optionally only accepted/rejected ones) were seen."""
        def enough(_: ReceivedExports) -> list[ExportAttempt] | None:
            atts = [a for a in self.attempts(signal) if accepted is None or a.accepted == accepted]
            return atts if len(atts) >= count else None

        return self.wait_until(enough, timeout_s)

    def _summary_locked(self) -> str:
        counts: dict[str, int] = {}
        for (s, _t, a), n in self._counts.items():
            k = f"{s}_{'accepted' if a else 'rejected'}"
            counts[k] = counts.get(k, 0) + n
        return f"export calls: {counts or 'none'}, bad requests: {self._bad_requests}{self._state_note()}"

    def _summary(self) -> str:
        with self._cond:
            return self._summary_locked()

    def _state_note(self) -> str:
        """Appended to timeout messages (the receiver adds whether it is running)."""
        return ""


def _match(predicate: Callable[[dict[str, Any]], Any] | None, item: dict[str, Any]) -> bool:
    if predicate is None:
        return True
    try:
        return bool(predicate(item))
    except LookupError:
        return False
