"""Decoding of the official OTLP proto messages into plain Python records (pure functions).

A test reads what exporters sent as dicts: :func:`flatten_spans` gives one dict per span,
:func:`flatten_metrics` one per metric data point, :func:`flatten_logs` one per log record.
Ids are lower-case hex strings (``None`` when empty); enums are short names (``"server"``,
``"error"``, ``"cumulative"``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["any_value_to_python", "flatten_spans", "flatten_metrics", "flatten_logs", "FLATTENERS", "count_items"]

_SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "unspecified",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}
_STATUS_CODES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "unset",
    trace_pb2.Status.STATUS_CODE_OK: "ok",
    trace_pb2.Status.STATUS_CODE_ERROR: "error",
}
_TEMPORALITIES = {
    metrics_pb2.AGGREGATION_TEMPORALITY_UNSPECIFIED: "unspecified",
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: "delta",
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
}


def any_value_to_python(value: common_pb2.AnyValue) -> Any:
    """Convert an OTLP ``AnyValue`` into the matching plain Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value_to_python(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attrs(value.kvlist_value.values)
    return getattr(value, kind)


def _attrs(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value_to_python(kv.value) for kv in kvs}


def _hex(raw: bytes) -> str | None:
    return raw.hex() if raw else None


def _scope(scope: common_pb2.InstrumentationScope) -> dict[str, Any]:
    return {"name": scope.name, "version": scope.version, "attributes": _attrs(scope.attributes)}


def _walk(resources: Iterable[Any], scopes: str, items: str) -> Iterator[tuple[dict, dict, Any]]:
    """(resource attributes, scope, item) for every item of an export request, in order.

    The three signals nest the same way under different field names (``scope_spans`` /
    ``spans``, ``scope_metrics`` / ``metrics``, ``scope_logs`` / ``log_records``)."""
    for rx in resources:
        resource = _attrs(rx.resource.attributes)
        for sx in getattr(rx, scopes):
            scope = _scope(sx.scope)
            for item in getattr(sx, items):
                yield resource, scope, item


def flatten_spans(req: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for resource, scope, sp in _walk(req.resource_spans, "scope_spans", "spans"):
        out.append({
            "name": sp.name,
            "trace_id": sp.trace_id.hex(),
            "span_id": sp.span_id.hex(),
            "parent_span_id": _hex(sp.parent_span_id),
            "trace_state": sp.trace_state,
            "flags": sp.flags,
            "kind": _SPAN_KINDS.get(sp.kind, str(sp.kind)),
            "start_ns": sp.start_time_unix_nano,
            "end_ns": sp.end_time_unix_nano,
            "duration_ns": sp.end_time_unix_nano - sp.start_time_unix_nano,
            "attributes": _attrs(sp.attributes),
            "dropped_attributes_count": sp.dropped_attributes_count,
            "events": [{"name": ev.name, "time_ns": ev.time_unix_nano,
                        "attributes": _attrs(ev.attributes)} for ev in sp.events],
            "links": [{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex(),
                       "attributes": _attrs(ln.attributes)} for ln in sp.links],
            "status": {"code": _STATUS_CODES.get(sp.status.code, str(sp.status.code)),
                       "message": sp.status.message},
            "resource": resource,
            "scope": scope,
        })
    return out


def _exemplars(exs: Iterable[metrics_pb2.Exemplar]) -> list[dict[str, Any]]:
    out = []
    for ex in exs:
        which = ex.WhichOneof("value")
        out.append({
            "trace_id": _hex(ex.trace_id),
            "span_id": _hex(ex.span_id),
            "value": getattr(ex, which) if which else None,
            "time_ns": ex.time_unix_nano,
            "attributes": _attrs(ex.filtered_attributes),
        })
    return out


def _number_value(dp: metrics_pb2.NumberDataPoint) -> int | float | None:
    which = dp.WhichOneof("value")
    return getattr(dp, which) if which else None


def flatten_metrics(req: metrics_service_pb2.ExportMetricsServiceRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for resource, scope, m in _walk(req.resource_metrics, "scope_metrics", "metrics"):
        kind = m.WhichOneof("data")
        base = {"name": m.name, "unit": m.unit, "description": m.description,
                "resource": resource, "scope": scope}
        if kind in ("sum", "gauge"):
            data = getattr(m, kind)
            temporality = (_TEMPORALITIES.get(data.aggregation_temporality)
                           if kind == "sum" else None)
            monotonic = data.is_monotonic if kind == "sum" else None
            for dp in data.data_points:
                out.append({**base, "type": kind, "temporality": temporality,
                            "monotonic": monotonic, "attributes": _attrs(dp.attributes),
                            "start_ns": dp.start_time_unix_nano, "time_ns": dp.time_unix_nano,
                            "value": _number_value(dp), "exemplars": _exemplars(dp.exemplars)})
        elif kind == "histogram":
            temporality = _TEMPORALITIES.get(m.histogram.aggregation_temporality)
            for dp in m.histogram.data_points:
                out.append({**base, "type": "histogram", "temporality": temporality,
                            **_histogram_point(dp),
                            "bucket_counts": list(dp.bucket_counts),
                            "explicit_bounds": list(dp.explicit_bounds),
                            "exemplars": _exemplars(dp.exemplars)})
        elif kind == "exponential_histogram":
            temporality = _TEMPORALITIES.get(m.exponential_histogram.aggregation_temporality)
            for dp in m.exponential_histogram.data_points:
                out.append({**base, "type": "exp_histogram", "temporality": temporality,
                            **_histogram_point(dp),
                            "scale": dp.scale, "zero_count": dp.zero_count,
                            "positive": {"offset": dp.positive.offset,
                                         "bucket_counts": list(dp.positive.bucket_counts)},
                            "negative": {"offset": dp.negative.offset,
                                         "bucket_counts": list(dp.negative.bucket_counts)},
                            "exemplars": _exemplars(dp.exemplars)})
        elif kind == "summary":
            for dp in m.summary.data_points:
                out.append({**base, "type": "summary", "temporality": None, "monotonic": None,
                            "attributes": _attrs(dp.attributes),
                            "start_ns": dp.start_time_unix_nano, "time_ns": dp.time_unix_nano,
                            "count": dp.count, "sum": dp.sum,
                            "quantiles": [(q.quantile, q.value) for q in dp.quantile_values],
                            "exemplars": []})
        else:  # a metric without data: keep its name visible
            out.append({**base, "type": None, "temporality": None, "monotonic": None,
                        "attributes": {}, "exemplars": []})
    return out


def flatten_logs(req: logs_service_pb2.ExportLogsServiceRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for resource, scope, lr in _walk(req.resource_logs, "scope_logs", "log_records"):
        out.append({
            "body": any_value_to_python(lr.body) if lr.HasField("body") else None,
            "severity_number": int(lr.severity_number),
            "severity_text": lr.severity_text,
            "event_name": lr.event_name,
            "attributes": _attrs(lr.attributes),
            "trace_id": _hex(lr.trace_id),
            "span_id": _hex(lr.span_id),
            "time_ns": lr.time_unix_nano,
            "observed_time_ns": lr.observed_time_unix_nano,
            "resource": resource,
            "scope": scope,
        })
    return out


FLATTENERS: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
    "traces": flatten_spans, "metrics": flatten_metrics, "logs": flatten_logs,
}


def count_items(signal: str, req: Any) -> int:
    if signal == "traces":
        return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    if signal == "logs":
        return sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                n += len(getattr(m, kind).data_points) if kind else 1
    return n


def _histogram_point(dp: Any) -> dict[str, Any]:
    """What a histogram and an exponential histogram data point share."""
    return {"monotonic": None, "attributes": _attrs(dp.attributes),
            "start_ns": dp.start_time_unix_nano, "time_ns": dp.time_unix_nano, "count": dp.count,
            "sum": dp.sum if dp.HasField("sum") else None,
            "min": dp.min if dp.HasField("min") else None,
            "max": dp.max if dp.HasField("max") else None}
