"""Private OpenTelemetry providers configured by the standard OTEL_* variables.

We never install a global provider: vLLM sets its own global TracerProvider when started with
``--otlp-traces-endpoint``, and the user's app may too. Ours are private, so both coexist.
"""

from __future__ import annotations

from typing import Any, Sequence

from vllm_otel.telemetry.export import BoundedSpanProcessor, CountingMetricExporter, ExportStats
from vllm_otel.telemetry.settings import OtelSettings

__all__ = ["build_tracer_provider", "build_meter_provider"]


def _span_exporter(protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


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
                         views: Sequence[Any] = ()) -> Any | None:
    """A private MeterProvider exporting periodically over OTLP, or None when metrics are off."""
    if not settings.metrics_enabled:
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    def counted(ok: bool) -> None:
        (stats.exported if ok else stats.failed)["metrics"] += 1

    exporter = CountingMetricExporter(_metric_exporter(settings.metrics_protocol), counted)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=settings.export_interval_ms,
                                           export_timeout_millis=min(settings.export_interval_ms, 10_000))
    return MeterProvider(resource=resource, metric_readers=[reader], views=list(views))
