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

    def __init__(self, sampler: Any, send: Callable[[Any], bool], stats: Any, resource: Any, scope: tuple[str, str],
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

    def encode(self, items: list[tuple]) -> tuple[Any, int]:
        """An ``ExportTraceServiceRequest`` holding the spans of ``items``, and its span count."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource
        from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

        server, internal = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_INTERNAL
        spans = []
        for tid, sid, parent, tracestate, st, end_s, engine, name, op in items:
            t = phase_times(end_s, st)
            reason = str(getattr(st.finish_reason, "name", st.finish_reason)).lower()
            attrs = [(sc.OPERATION_NAME, op), (sc.PROVIDER_NAME, sc.PROVIDER), (sc.REQUEST_MODEL, self._model),
                     (sc.RESPONSE_MODEL, self._model), (sc.USAGE_INPUT_TOKENS, st.num_prompt_tokens),
                     (sc.USAGE_OUTPUT_TOKENS, st.num_generation_tokens), (sc.RESPONSE_FINISH_REASONS, (reason,)),
                     (sc.ENGINE, engine), ("vllm.request.num_preemptions", st.num_preemptions),
                     ("vllm.request.num_cached_tokens", getattr(st, "num_cached_tokens", 0)), *self._server]
            if st.request_id:
                attrs.append((sc.RESPONSE_ID, st.request_id))
            if st.max_tokens_param is not None:
                attrs.append((sc.REQUEST_MAX_TOKENS, st.max_tokens_param))
            events = []
            if st.num_generation_tokens > 0:
                events.append(Span.Event(name="first_token", time_unix_nano=_ns(t["first_token"])))
            if st.num_preemptions:
                events.append(Span.Event(name="preempted", time_unix_nano=_ns(t["scheduled"]),
                                         attributes=_kvs([("vllm.request.num_preemptions", st.num_preemptions)])))
            status = None
            if reason in ("abort", "error"):
                attrs.append((sc.ERROR_TYPE, "aborted" if reason == "abort" else "error"))
                status = Status(code=Status.STATUS_CODE_ERROR, message=reason)
                events.append(Span.Event(name="aborted", time_unix_nano=_ns(t["end"])))
            else:
                events.append(Span.Event(name="finished", time_unix_nano=_ns(t["end"]),
                                         attributes=_kvs([("finish_reason", reason)])))
            tid_b, sid_b = tid.to_bytes(16, "big"), sid.to_bytes(8, "big")
            state = tracestate or ""
            spans.append(Span(trace_id=tid_b, span_id=sid_b, trace_state=state, name=name, kind=server,
                              parent_span_id=parent[1].to_bytes(8, "big") if parent else b"",
                              flags=0x01 | _HAS_IS_REMOTE | (_IS_REMOTE if parent else 0),
                              start_time_unix_nano=_ns(t["start"]), end_time_unix_nano=_ns(t["end"]),
                              attributes=_kvs(attrs), events=events, status=status))
            for child, a, b in (("queued", t["queued"], t["scheduled"]),
                                ("prefill", t["scheduled"], t["first_token"]),
                                ("decode", t["first_token"], t["end"])):
                if b > a or child == "queued":
                    spans.append(Span(trace_id=tid_b, span_id=(self._rand.getrandbits(64) or 1).to_bytes(8, "big"),
                                      trace_state=state, parent_span_id=sid_b, name=child, kind=internal,
                                      flags=0x01 | _HAS_IS_REMOTE, start_time_unix_nano=_ns(a),
                                      end_time_unix_nano=_ns(max(a, b))))
        scope = InstrumentationScope(name=self._scope[0], version=self._scope[1])
        resource = Resource(attributes=_kvs(self._resource.attributes.items()))
        request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
            resource=resource, scope_spans=[ScopeSpans(scope=scope, spans=spans)])])
        return request, len(spans)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=15)

    def queue_size(self) -> int:
        return len(self._queue)


def _kvs(pairs: Any) -> list[Any]:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue

    out = []
    for k, v in pairs:
        if isinstance(v, bool):
            val = AnyValue(bool_value=v)
        elif isinstance(v, int):
            val = AnyValue(int_value=v)
        elif isinstance(v, float):
            val = AnyValue(double_value=v)
        elif isinstance(v, (tuple, list)):
            val = AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=str(x)) for x in v]))
        else:
            val = AnyValue(string_value=str(v))
        out.append(KeyValue(key=k, value=val))
    return out
