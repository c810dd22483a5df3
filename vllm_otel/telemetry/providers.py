"""Private OpenTelemetry providers configured by the standard OTEL_* variables.

We never install a global provider: vLLM sets its own global TracerProvider when started with
``--otlp-traces-endpoint``, and the user's app may too. Ours are private, so both coexist.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from vllm_otel.telemetry.export import BoundedSpanProcessor, CountingMetricExporter, ExportStats
from vllm_otel.telemetry.settings import OtelSettings

__all__ = ["build_tracer_provider", "build_meter_provider", "send_encoded"]


def _span_exporter(protocol: str) -> Any:
    """The SDK's OTLP span exporter for ``protocol``, also taking an ``ExportTraceServiceRequest``
    already built, as a message or in wire format (:func:`send_encoded`): what vLLM's request spans need, built in bulk without
    the SDK's span objects (see :mod:`vllm_otel.instrument.tracing`)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    def count(req: ExportTraceServiceRequest) -> int:
        return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        class Exporter(OTLPSpanExporter):
            # The gRPC exporter's own hooks: translation and counting of what it sends.
            def _translate_data(self, data: Any) -> Any:
                if isinstance(data, bytes):
                    return ExportTraceServiceRequest.FromString(data)
                return data if isinstance(data, ExportTraceServiceRequest) else super()._translate_data(data)

            def _count_data(self, data: Any) -> int:
                if isinstance(data, bytes):
                    return 0  # only the SDK's own self-metrics would use it
                return count(data) if isinstance(data, ExportTraceServiceRequest) else super()._count_data(data)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import SpanExportResult

        class Exporter(OTLPSpanExporter):  # type: ignore[no-redef]
            def export(self, data: Any) -> Any:
                if not isinstance(data, (bytes, ExportTraceServiceRequest)):
                    return super().export(data)
                body = data if isinstance(data, bytes) else data.SerializePartialToString()
                client = getattr(self, "_client", None)
                if client is not None and hasattr(client, "export"):  # SDK >= 1.40
                    ok = client.export(body).success
                else:  # older SDKs: one POST, no retries
                    resp = self._export(body)
                    ok = bool(getattr(resp, "ok", False))
                return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE
    return Exporter()


def send_encoded(exporter: Any) -> Callable[[Any], bool]:
    """``send(request) -> ok`` through an exporter made by :func:`_span_exporter`."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    return lambda request: exporter.export(request) == SpanExportResult.SUCCESS


def _metric_exporter(protocol: str, views_temporality: Any = None) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


def build_tracer_provider(settings: OtelSettings, resource: Any, stats: ExportStats) -> tuple[Any, Any] | None:
    """A private TracerProvider with our bounded processor, or None when traces are off."""
    if not settings.traces_enabled:
        return None
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER(_ARG)
    processor = BoundedSpanProcessor(_span_exporter(settings.traces_protocol), stats)
    provider.add_span_processor(processor)
    return provider, processor


def build_meter_provider(settings: OtelSettings, resource: Any, stats: ExportStats,
                         views: Sequence[Any] = (), histograms: Any = None, scope: Any = None) -> Any | None:
    """A private MeterProvider exporting periodically over OTLP, or None when metrics are off.

    ``histograms`` (a :class:`~vllm_otel.telemetry.histograms.HistogramSet`) go out with each
    export under the instrumentation ``scope``."""
    if not settings.metrics_enabled:
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    def counted(ok: bool) -> None:
        (stats.exported if ok else stats.failed)["metrics"] += 1

    exporter = CountingMetricExporter(_metric_exporter(settings.metrics_protocol), counted, histograms, scope)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=settings.export_interval_ms,
                                           export_timeout_millis=min(settings.export_interval_ms, 10_000))
    return MeterProvider(resource=resource, metric_readers=[reader], views=list(views))
