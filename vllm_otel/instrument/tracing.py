"""Per-request spans built from vLLM's finished-request stats, encoded straight to OTLP.

vLLM reports each finished request once, with its phase durations (queued, prefill, decode) and
preemption count; we turn that into a SERVER span named ``{operation} {model}`` with child spans
``queued``, ``prefill`` and ``decode`` and events ``first_token``, ``preempted`` and
``finished`` / ``aborted``, continuing the client's ``traceparent``.

Cost is what decides the design: vLLM's API server is one Python thread, and four SDK spans per
request (``start_span``, attribute cleaning, ``end``, then the exporter's generic encoding) cost
about 300 us of it. So on vLLM's path :meth:`RequestSpans.record` only asks the sampler
(``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, through the SDK's own sampler) and, for a
sampled request, queues a tuple (a couple of us); a sampled-out request costs the sampler call
alone. A daemon thread turns queued requests into OTLP protobuf spans in bulk and hands the
finished ``ExportTraceServiceRequest`` to the SDK's OTLP exporter (endpoint, headers, TLS,
compression and timeout as the OTEL_* variables say). The queue is bounded: when the collector
is slow or down, spans are dropped and counted, never blocking vLLM.

If vLLM's own tracing is on (``--otlp-traces-endpoint``) vLLM already emits one ``llm_request``
span per request; we then emit none, so a trace never holds the same request twice.
"""

from __future__ import annotations

import collections
import random
import struct
import threading
from typing import Any, Callable

from vllm_otel.instrument import semconv as sc
from vllm_otel.instrument.guard import logger
from vllm_otel.instrument.requests import RequestInfo

__all__ = ["RequestSpans", "phase_times", "parse_traceparent"]

# OTLP span flags (trace.proto): the "is remote" bits say whether the parent is known to be remote.
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


def phase_times(end_s: float, stats: Any) -> dict[str, float]:
    """Absolute phase boundaries (seconds) from the durations vLLM reports at finish."""
    start = end_s - max(stats.e2e_latency, 0.0)
    scheduled = end_s - max(stats.inference_time, 0.0)
    queued = max(start, scheduled - max(stats.queued_time, 0.0))
    first_token = min(end_s, scheduled + max(stats.prefill_time, 0.0))
    return {"start": start, "queued": queued, "scheduled": scheduled, "first_token": first_token,
            "end": end_s}


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """W3C ``traceparent`` -> (trace id, parent span id, flags); None when absent or invalid."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        tid, sid, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not tid or not sid:
        return None
    return tid, sid, flags


def _ns(t: float) -> int:
    return int(t * 1e9)


class RequestSpans:
    """Sample on vLLM's path, encode and export in bulk on a daemon thread."""

    def __init__(self, sampler: Any, send: Callable[[bytes], bool], stats: Any, resource: Any, scope: tuple[str, str],
                 model: str, server_address: str | None, server_port: int | None, *, max_queue: int = 2048,
                 batch: int = 512, delay_s: float = 2.0) -> None:
        from opentelemetry.trace import SpanKind

        self._sampler = sampler
        self._send = send
        self._stats = stats
        self._resource = resource
        self._scope = scope
        self._kind = SpanKind.SERVER
        self._model = model
        self._server = [(k, v) for k, v in ((sc.SERVER_ADDRESS, server_address), (sc.SERVER_PORT, server_port))
                        if v is not None]
        self._const_attrs: dict[str, bytes] = {}
        # ResourceSpans.resource (field 1) and ScopeSpans.scope (field 1), encoded once.
        self._resource_b = _ld(b"\x0a", b"".join(_ld(b"\x0a", _kv(k, v)) for k, v in resource.attributes.items()))
        self._scope_b = _ld(b"\x0a", _ld(b"\x0a", scope[0].encode()) + _ld(b"\x12", scope[1].encode()))
        self._queue: collections.deque = collections.deque()
        self._max_queue, self._batch, self._delay_s = max_queue, batch, delay_s
        self._wake = threading.Event()
        self._stop = False
        self._warned = False
        self._rand = random.Random()
        self._thread = threading.Thread(target=self._run, name="vllm-otel-span-export", daemon=True)
        self._thread.start()

    # ---- vLLM's path -------------------------------------------------------------------------------
    def record(self, stats: Any, end_s: float, engine: int, info: RequestInfo | None) -> tuple[int, int] | None:
        """Queue one finished request's spans if sampled; returns (trace id, span id) or None."""
        op = info.operation if info else sc.DEFAULT_OPERATION
        parent = parse_traceparent(info.traceparent) if info is not None else None
        ctx = None
        if parent is not None:
            tid = parent[0]
            ctx = self._parent_context(parent, info.tracestate if info else None)
        else:
            tid = self._rand.getrandbits(128) or 1
        name = f"{op} {self._model}"
        if not self._sampler.should_sample(ctx, tid, name, self._kind).decision.is_sampled():
            return None
        if len(self._queue) >= self._max_queue:
            self._stats.dropped["traces"] += 4
            if not self._warned:
                self._warned = True
                logger.warning("vllm-otel: span queue full (collector down or slow?); dropping spans, "
                               "see vllm_otel_otlp_dropped_total")
            return None
        sid = self._rand.getrandbits(64) or 1
        self._queue.append((tid, sid, parent, info.tracestate if info else None, stats, end_s, engine, name, op))
        if len(self._queue) >= self._batch:
            self._wake.set()
        return tid, sid

    @staticmethod
    def _parent_context(parent: tuple[int, int, int], tracestate: str | None) -> Any:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

        state = TraceState.from_header([tracestate]) if tracestate else None
        sc_ = SpanContext(parent[0], parent[1], is_remote=True, trace_flags=TraceFlags(parent[2] & 1),
                          trace_state=state)
        return trace.set_span_in_context(NonRecordingSpan(sc_))

    # ---- the export thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self.flush()
        self.flush()  # what is queued at shutdown still goes out (bounded by the exporter timeout)

    def flush(self) -> None:
        while self._queue:
            items = []
            while self._queue and len(items) < self._batch:
                items.append(self._queue.popleft())
            n = 0
            try:
                request, n = self.encode(items)
                ok = bool(self._send(request))
            except Exception:  # noqa: BLE001 - an exporter or encoding bug must not kill the thread
                logger.debug("vllm-otel: span export failed", exc_info=True)
                ok, n = False, n or 4 * len(items)
            if ok:
                self._stats.exported["traces"] += n
                self._warned = False
            else:
                self._stats.failed["traces"] += 1
                self._stats.dropped["traces"] += n

    def encode(self, items: list[tuple]) -> tuple[bytes, int]:
        """An OTLP ``ExportTraceServiceRequest`` (wire format) with the spans of ``items``, and
        its span count. Written directly: the constant parts (resource, scope, model and server
        attributes) are encoded once, timestamps are fixed64, so a request's four spans cost a
        few joins instead of dozens of protobuf objects."""
        out = []
        rand = self._rand.getrandbits
        for tid, sid, parent, tracestate, st, end_s, engine, name, op in items:
            t = phase_times(end_s, st)
            reason = str(getattr(st.finish_reason, "name", st.finish_reason)).lower()
            attrs = [self._op_attrs(op, name), _attr(sc.USAGE_INPUT_TOKENS, st.num_prompt_tokens),
                     _attr(sc.USAGE_OUTPUT_TOKENS, st.num_generation_tokens),
                     _attr(sc.RESPONSE_FINISH_REASONS, (reason,)), _attr(sc.ENGINE, engine),
                     _attr("vllm.request.num_preemptions", st.num_preemptions),
                     _attr("vllm.request.num_cached_tokens", getattr(st, "num_cached_tokens", 0) or 0)]
            if st.request_id:
                attrs.append(_attr(sc.RESPONSE_ID, st.request_id))
            if st.max_tokens_param is not None:
                attrs.append(_attr(sc.REQUEST_MAX_TOKENS, st.max_tokens_param))
            events = []
            if st.num_generation_tokens > 0:
                events.append(_event(b"first_token", t["first_token"]))
            if st.num_preemptions:
                events.append(_event(b"preempted", t["scheduled"],
                                     _ld(b"\x1a", _kv("vllm.request.num_preemptions", st.num_preemptions))))
            status = b""
            if reason in ("abort", "error"):
                attrs.append(_attr(sc.ERROR_TYPE, "aborted" if reason == "abort" else "error"))
                status = _ld(b"\x7a", _ld(b"\x12", reason.encode()) + b"\x18\x02")  # STATUS_CODE_ERROR
                events.append(_event(b"aborted", t["end"]))
            else:
                events.append(_event(b"finished", t["end"], _ld(b"\x1a", _kv("finish_reason", reason))))
            tid_b, sid_b = tid.to_bytes(16, "big"), sid.to_bytes(8, "big")
            head = b"\x0a\x10" + tid_b + (_ld(b"\x1a", tracestate.encode()) if tracestate else b"")
            flags = _FLAGS_REMOTE_PARENT if parent else _FLAGS_LOCAL
            out.append(_ld(b"\x12", head + b"\x12\x08" + sid_b
                           + (b"\x22\x08" + parent[1].to_bytes(8, "big") if parent else b"")
                           + _ld(b"\x2a", name.encode()) + b"\x30\x02" + b"\x39" + _Q(_ns(t["start"]))
                           + b"\x41" + _Q(_ns(t["end"])) + b"".join(attrs) + b"".join(events) + status + flags))
            child_head = head + b"\x22\x08" + sid_b + b"\x30\x01" + _FLAGS_LOCAL
            for child, a, b in ((b"\x2a\x06queued", t["queued"], t["scheduled"]),
                                (b"\x2a\x07prefill", t["scheduled"], t["first_token"]),
                                (b"\x2a\x06decode", t["first_token"], t["end"])):
                if b > a or child == b"\x2a\x06queued":
                    out.append(_ld(b"\x12", child_head + child + b"\x12\x08" + (rand(64) or 1).to_bytes(8, "big")
                                   + b"\x39" + _Q(_ns(a)) + b"\x41" + _Q(_ns(max(a, b)))))
        scope_spans = self._scope_b + b"".join(out)
        request = _ld(b"\x0a", self._resource_b + _ld(b"\x12", scope_spans))
        return request, len(out)

    def _op_attrs(self, op: str, name: str) -> bytes:
        """The attributes every span of operation ``op`` shares, encoded once."""
        got = self._const_attrs.get(op)
        if got is None:
            got = self._const_attrs[op] = b"".join(_attr(k, v) for k, v in (
                (sc.OPERATION_NAME, op), (sc.PROVIDER_NAME, sc.PROVIDER), (sc.REQUEST_MODEL, self._model),
                (sc.RESPONSE_MODEL, self._model), *self._server))
        return got

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=15)

    def queue_size(self) -> int:
        return len(self._queue)


_Q = struct.Struct("<Q").pack
_D = struct.Struct("<d").pack
# Span.flags (fixed32, field 16): sampled, and whether the parent is known to be remote.
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", 0x01 | _HAS_IS_REMOTE)
_FLAGS_REMOTE_PARENT = b"\x85\x01" + struct.pack("<I", 0x01 | _HAS_IS_REMOTE | _IS_REMOTE)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _any(value: Any) -> bytes:
    """An encoded ``AnyValue``."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _D(value)
    if isinstance(value, (tuple, list)):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any(str(x))) for x in value))
    return _ld(b"\x0a", str(value).encode())


def _kv(key: str, value: Any) -> bytes:
    """An encoded ``KeyValue``."""
    return _ld(b"\x0a", key.encode()) + _ld(b"\x12", _any(value))


def _attr(key: str, value: Any) -> bytes:
    """One ``Span.attributes`` entry (field 9)."""
    return _ld(b"\x4a", _kv(key, value))


def _event(name: bytes, at_s: float, attrs: bytes = b"") -> bytes:
    """One ``Span.events`` entry (field 11): time (fixed64), name, attributes."""
    return _ld(b"\x5a", b"\x09" + _Q(_ns(at_s)) + _ld(b"\x12", name) + attrs)
