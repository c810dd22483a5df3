"""Per-request spans built from vLLM's finished-request stats.

vLLM reports each finished request once, with its phase durations (queued, prefill, decode) and
preemption count; we turn that into a SERVER span named ``{operation} {model}`` with child spans
``queued``, ``prefill`` and ``decode`` and events ``first_token``, ``preempted`` and
``finished`` / ``aborted``, continuing the client's ``traceparent``. Building spans after the fact
keeps the engine's hot loop untouched: the only per-step cost is in vLLM's stat-logger call.

If vLLM's own tracing is on (``--otlp-traces-endpoint``) vLLM already emits one ``llm_request``
span per request; we then emit none, so a trace never holds the same request twice.
"""

from __future__ import annotations

from typing import Any

from vllm_otel.instrument import semconv as sc
from vllm_otel.instrument.requests import RequestInfo

__all__ = ["RequestSpanBuilder", "phase_times"]


def phase_times(end_s: float, stats: Any) -> dict[str, float]:
    """Absolute phase boundaries (seconds) from the durations vLLM reports at finish."""
    start = end_s - max(stats.e2e_latency, 0.0)
    scheduled = end_s - max(stats.inference_time, 0.0)
    queued = max(start, scheduled - max(stats.queued_time, 0.0))
    first_token = min(end_s, scheduled + max(stats.prefill_time, 0.0))
    return {"start": start, "queued": queued, "scheduled": scheduled, "first_token": first_token,
            "end": end_s}


def _ns(t: float) -> int:
    return int(t * 1e9)


class RequestSpanBuilder:
    def __init__(self, tracer: Any, model: str, server_address: str | None, server_port: int | None) -> None:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._kind = SpanKind.SERVER
        self._prop = TraceContextTextMapPropagator()
        self._model = model
        self._server = {k: v for k, v in ((sc.SERVER_ADDRESS, server_address),
                                          (sc.SERVER_PORT, server_port)) if v is not None}

    def parent_context(self, info: RequestInfo | None) -> Any:
        if info is None or not info.traceparent:
            return None
        carrier = {"traceparent": info.traceparent}
        if info.tracestate:
            carrier["tracestate"] = info.tracestate
        return self._prop.extract(carrier)

    def build(self, stats: Any, end_s: float, engine: int, info: RequestInfo | None) -> Any:
        """Emit the spans of one finished request; returns the root span (ended)."""
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        op = info.operation if info else sc.DEFAULT_OPERATION
        t = phase_times(end_s, stats)
        reason = str(getattr(stats.finish_reason, "name", stats.finish_reason)).lower()
        attrs: dict[str, Any] = {
            sc.OPERATION_NAME: op, sc.PROVIDER_NAME: sc.PROVIDER, sc.REQUEST_MODEL: self._model,
            sc.RESPONSE_MODEL: self._model, sc.USAGE_INPUT_TOKENS: stats.num_prompt_tokens,
            sc.USAGE_OUTPUT_TOKENS: stats.num_generation_tokens,
            sc.RESPONSE_FINISH_REASONS: (reason,), sc.ENGINE: engine,
            "vllm.request.num_preemptions": stats.num_preemptions,
            "vllm.request.num_cached_tokens": getattr(stats, "num_cached_tokens", 0),
            **self._server,
        }
        if stats.request_id:
            attrs[sc.RESPONSE_ID] = stats.request_id
        if stats.max_tokens_param is not None:
            attrs[sc.REQUEST_MAX_TOKENS] = stats.max_tokens_param
        root = self._tracer.start_span(f"{op} {self._model}", context=self.parent_context(info),
                                       kind=self._kind, attributes=attrs, start_time=_ns(t["start"]))
        ctx = trace.set_span_in_context(root)
        for name, a, b in (("queued", t["queued"], t["scheduled"]),
                           ("prefill", t["scheduled"], t["first_token"]),
                           ("decode", t["first_token"], t["end"])):
            if b > a or name == "queued":
                self._tracer.start_span(name, context=ctx, start_time=_ns(a)).end(end_time=_ns(max(a, b)))
        if stats.num_generation_tokens > 0:
            root.add_event("first_token", timestamp=_ns(t["first_token"]))
        if stats.num_preemptions:
            root.add_event("preempted", {"vllm.request.num_preemptions": stats.num_preemptions},
                           timestamp=_ns(t["scheduled"]))
        if reason in ("abort", "error"):
            root.set_attribute(sc.ERROR_TYPE, "aborted" if reason == "abort" else "error")
            root.set_status(Status(StatusCode.ERROR, reason))
            root.add_event("aborted", timestamp=_ns(t["end"]))
        else:
            root.add_event("finished", {"finish_reason": reason}, timestamp=_ns(t["end"]))
        root.end(end_time=_ns(t["end"]))
        return root
