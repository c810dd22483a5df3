"""What the HTTP layer knows about a request, handed to the stat logger by request id.

vLLM's stat logger sees finished requests with their timings but not their HTTP context: the
client's W3C ``traceparent`` (vLLM forwards it only when its own tracing is on) or which OpenAI
route was called (the GenAI ``gen_ai.operation.name``). A tiny ASGI middleware, installed by our
endpoint plugin, records both under the request id vLLM will use, which vLLM takes from the
``X-Request-Id`` header (``cmpl-<X-Request-Id>-<n>``); when the client sends none we add one.
"""

from __future__ import annotations

import re
import threading
import time
import itertools
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from vllm_otel.instrument.semconv import OPERATION_BY_PATH

__all__ = ["RequestInfo", "RequestRegistry", "registry", "RequestContextMiddleware", "candidate_keys"]

_SUFFIX = re.compile(r"-\d+$")
# Ids we give requests that came without X-Request-Id: a random per-process prefix and a counter
# (unique like a uuid4 per request, at a tenth of its cost on the request path).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)


@dataclass(slots=True)
class RequestInfo:
    operation: str
    path: str
    received_at: float
    traceparent: str | None = None
    tracestate: str | None = None
    # The HTTP exchange is over (answered, or the client went away): no longer work the engine
    # owes anyone. The entry stays until the stat logger takes it (span context).
    closed: bool = False


class RequestRegistry:
    """Bounded map request key -> RequestInfo. Entries leave on finish or when the bound is hit."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._items: OrderedDict[str, RequestInfo] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.evicted = 0

    def put(self, key: str, info: RequestInfo) -> None:
        with self._lock:
            self._items[key] = info
            while len(self._items) > self._max:
                self._items.popitem(last=False)
                self.evicted += 1

    def pop(self, request_id: str | None) -> RequestInfo | None:
        if not request_id:
            return None
        with self._lock:
            for key in candidate_keys(request_id):
                info = self._items.pop(key, None)
                if info is not None:
                    return info
        return None

    def oldest_received(self, max_age_s: float, since: float | None = None) -> float | None:
        """Arrival time of the oldest unfinished request not older than ``max_age_s`` (and
        received at or after ``since``).

        The age bound keeps one lost entry (a request that died without vLLM reporting it) from
        looking like pending work forever.
        """
        cutoff = time.time() - max_age_s
        if since is not None:
            cutoff = max(cutoff, since)
        with self._lock:
            for info in self._items.values():
                if info.received_at >= cutoff and not info.closed:
                    return info.received_at
        return None

    def close(self, key: str) -> None:
        """The HTTP exchange of ``key`` ended (see :attr:`RequestInfo.closed`)."""
        with self._lock:
            info = self._items.get(key)
            if info is not None:
                info.closed = True

    def __len__(self) -> int:
        return len(self._items)


def candidate_keys(request_id: str) -> list[str]:
    """``cmpl-abc-0`` -> [``cmpl-abc-0``, ``abc-0``, ``abc``]: how vLLM decorates X-Request-Id."""
    keys = [request_id]
    head, sep, rest = request_id.partition("-")
    if sep and rest:
        keys.append(rest)
        stripped = _SUFFIX.sub("", rest)
        if stripped != rest:
            keys.append(stripped)
    return keys


registry = RequestRegistry()


class RequestContextMiddleware:
    """Pure ASGI middleware (no response buffering, so streaming is untouched)."""

    def __init__(self, app: Any, registry: RequestRegistry = registry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        rid = None
        if scope.get("type") == "http" and scope.get("method") == "POST":
            try:
                rid = self._record(scope)
            except Exception:  # noqa: BLE001 - never fail a request because of us
                rid = None
        if rid is None:
            await self.app(scope, receive, send)
            return
        registry_ = self.registry

        async def send_and_forget_rejected(message: dict) -> None:
            # A request vLLM rejects (4xx/5xx before the engine) never reaches the stat logger;
            # forget it now so it cannot look like pending work to the stall detector.
            if message["type"] == "http.response.start" and message.get("status", 200) >= 400:
                registry_.pop(rid)
            await send(message)

        try:
            await self.app(scope, receive, send_and_forget_rejected)
        finally:
            # Answered, failed or abandoned by its client: whatever the engine does with it
            # now, nobody is waiting (the stall detector must not count it as pending work).
            try:
                registry_.close(rid)
            except Exception:  # noqa: BLE001
                pass

    def _record(self, scope: dict) -> str | None:
        op = OPERATION_BY_PATH.get(scope.get("path", ""))
        if op is None:
            return None
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        rid = tp = ts = None
        for k, v in headers:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
            elif k == b"traceparent":
                tp = v.decode("latin-1")
            elif k == b"tracestate":
                ts = v.decode("latin-1")
        if rid is None:
            rid = f"{_ID_PREFIX}{next(_ids):016x}"
            scope["headers"] = [*headers, (b"x-request-id", rid.encode())]
        self.registry.put(rid, RequestInfo(operation=op, path=scope["path"], received_at=time.time(),
                                           traceparent=tp, tracestate=ts))
        return rid
