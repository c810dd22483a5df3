"""OpenTelemetry providers for code running inside vLLM, configured by the standard OTEL_* variables.

We never install a global provider: vLLM sets its own global TracerProvider when started with
``--otlp-traces-endpoint``, and the user's app may too. Ours are private, so both coexist.

What the SDK does not read by itself and we therefore read here: ``OTEL_SDK_DISABLED``,
``OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_PROTOCOL``, ``OTEL_TRACES_EXPORTER`` /
``OTEL_METRICS_EXPORTER`` (``none`` turns a signal off) and ``OTEL_METRIC_EXPORT_INTERVAL``.
The exporters read endpoint, headers, timeout, compression and certificates themselves;
``Resource.create()`` reads ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``; the metric
exporters read ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``.

OTLP export is on only when an endpoint is configured: a Prometheus-only user gets no connection
errors to a collector they do not run.

Spans go through :class:`BoundedSpanProcessor` rather than the SDK's BatchSpanProcessor, whose
queue-full path logs a WARNING per dropped span (a log flood exactly when the collector is down)
and exposes no drop count; ours counts drops and failures for ``/metrics`` and never blocks.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from opentelemetry.sdk.trace import SpanProcessor

from vllm_otel.instrument.guard import logger

__all__ = ["OtelSettings", "BoundedSpanProcessor", "ExportStats", "build_resource",
           "build_tracer_provider", "build_meter_provider"]

_PROTOCOLS = {"grpc", "http/protobuf"}


@dataclass
class ExportStats:
    """Counters the Prometheus side publishes as vllm_otel_otlp_* (read by a custom collector)."""

    dropped: collections.Counter = field(default_factory=collections.Counter)   # signal -> items
    failed: collections.Counter = field(default_factory=collections.Counter)    # signal -> batches
    exported: collections.Counter = field(default_factory=collections.Counter)  # signal -> items


@dataclass(frozen=True)
class OtelSettings:
    traces_enabled: bool
    metrics_enabled: bool
    traces_protocol: str
    metrics_protocol: str
    export_interval_ms: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OtelSettings":
        env = os.environ if env is None else env
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"

        def proto(signal: str) -> str:
            p = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                 or "http/protobuf").strip().lower()
            if p not in _PROTOCOLS:
                logger.warning("vllm-otel: unsupported OTLP protocol %r for %s; using http/protobuf", p, signal)
                p = "http/protobuf"
            return p

        def enabled(signal: str, exporter_var: str) -> bool:
            if disabled:
                return False
            names = {n.strip().lower() for n in env.get(exporter_var, "otlp").split(",")}
            if "none" in names or "otlp" not in names:
                return False
            return bool(env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))

        try:
            interval = int(float(env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")))
        except ValueError:
            logger.warning("vllm-otel: bad OTEL_METRIC_EXPORT_INTERVAL; using 60000 ms")
            interval = 60000
        return cls(traces_enabled=enabled("TRACES", "OTEL_TRACES_EXPORTER"),
                   metrics_enabled=enabled("METRICS", "OTEL_METRICS_EXPORTER"),
                   traces_protocol=proto("TRACES"), metrics_protocol=proto("METRICS"),
                   export_interval_ms=max(interval, 100))


def build_resource(extra: Mapping[str, Any] | None = None) -> Any:
    """Resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES over our defaults.

    Our defaults tell vLLM instances apart (``service.instance.id`` = host:port of the server,
    host name, pid, model); anything the user sets through the standard variables wins.
    """
    from opentelemetry.sdk.resources import Resource

    attrs: dict[str, Any] = {"service.name": "vllm", "host.name": socket.gethostname(),
                             "process.pid": os.getpid()}
    attrs.update({k: v for k, v in (extra or {}).items() if v is not None})
    detected = dict(Resource.create({}).attributes)
    user_set = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in user_set:
        detected.pop("service.name", None)  # the SDK's "unknown_service:python" placeholder
    if "service.instance.id" in attrs and "service.instance.id=" not in user_set:
        detected.pop("service.instance.id", None)  # a random uuid the SDK made up
    attrs.update(detected)
    return Resource(attrs)


class BoundedSpanProcessor(SpanProcessor):
    """Ends spans into a bounded deque; a daemon thread exports batches. Never blocks the caller."""

    def __init__(self, exporter: Any, stats: ExportStats, *, max_queue: int = 2048, batch: int = 512,
                 delay_s: float = 2.0) -> None:
        self._exporter = exporter
        self._stats = stats
        self._queue: collections.deque = collections.deque()
        self._max_queue = max_queue
        self._batch = batch
        self._delay_s = delay_s
        self._wake = threading.Event()
        self._stop = False
        self._warned = False
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="vllm-otel-span-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: Any) -> None:
        if self._stop:
            return
        if len(self._queue) >= self._max_queue:
            self._stats.dropped["traces"] += 1
            if not self._warned:
                self._warned = True
                logger.warning("vllm-otel: span queue full (collector down or slow?); dropping spans, "
                               "see vllm_otel_otlp_dropped_total")
            return
        self._queue.append(span)
        if len(self._queue) >= self._batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._drain()
        self._drain()  # what is queued at shutdown still goes out (bounded by the exporter timeout)

    def _drain(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        while self._queue:
            batch = []
            while self._queue and len(batch) < self._batch:
                batch.append(self._queue.popleft())
            try:
                ok = self._exporter.export(batch) == SpanExportResult.SUCCESS
            except Exception:  # noqa: BLE001 - exporter bugs must not kill the thread
                ok = False
            if ok:
                self._stats.exported["traces"] += len(batch)
                self._warned = False
            else:
                self._stats.failed["traces"] += 1
                self._stats.dropped["traces"] += len(batch)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=15)
        try:
            self._exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._wake.set()
        return True

    def queue_size(self) -> int:
        return len(self._queue)


class CountingMetricExporter:
    """Delegates to an OTLP metric exporter and reports each export's success to ``on_result``;
    an exporter that raises counts as a failed export (a collector that is down is no crash).
    Used in vLLM (counts into :class:`ExportStats`) and by the forecaster (its error metric)."""

    def __init__(self, inner: Any, on_result: Callable[[bool], None]) -> None:
        self._inner = inner
        self._on_result = on_result
        # The reader asks the exporter for these.
        self._preferred_temporality = inner._preferred_temporality
        self._preferred_aggregation = inner._preferred_aggregation

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kw: Any) -> Any:
        from opentelemetry.sdk.metrics.export import MetricExportResult

        try:
            res = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kw)
        except Exception:  # noqa: BLE001
            res = MetricExportResult.FAILURE
        self._on_result(res == MetricExportResult.SUCCESS)
        return res

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kw: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kw)


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
