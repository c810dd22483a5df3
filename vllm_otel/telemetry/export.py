"""Export machinery with counted outcomes: what was exported, dropped or failed, per signal.

Spans go through :class:`BoundedSpanProcessor` rather than the SDK's BatchSpanProcessor, whose
queue-full path logs a WARNING per dropped span (a log flood exactly when the collector is down)
and exposes no drop count; ours counts drops and failures (vLLM's ``/metrics`` publishes them as
``vllm_otel_otlp_*``) and never blocks. :class:`CountingMetricExporter` does the same for metric
exports, in vLLM and in the forecaster.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from opentelemetry.sdk.trace import SpanProcessor

__all__ = ["ExportStats", "BoundedSpanProcessor", "CountingMetricExporter"]

logger = logging.getLogger("vllm_otel.telemetry")


@dataclass
class ExportStats:
    """Counters the Prometheus side publishes as vllm_otel_otlp_* (read by a custom collector)."""

    dropped: collections.Counter = field(default_factory=collections.Counter)   # signal -> items
    failed: collections.Counter = field(default_factory=collections.Counter)    # signal -> batches
    exported: collections.Counter = field(default_factory=collections.Counter)  # signal -> items


class BoundedSpanProcessor(SpanProcessor):
    """Ends spans into a bounded deque; a daemon thread exports batches. Never blocks the caller."""

    def __init__(self, exporter: Any, stats: ExportStats, *, max_queue: int = 2048, batch: int = 512,
                 delay_s: float = 2.0) -> None:
        self._exporter = self.exporter = exporter
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

    def __init__(self, inner: Any, on_result: Callable[[bool], None], extra: Any = None,
                 scope: Any = None) -> None:
        self._inner = inner
        self._on_result = on_result
        # A HistogramSet aggregated outside the SDK, sent in ``scope`` with the SDK's metrics.
        self._extra = extra
        self._scope = scope
        # The reader asks the exporter for these.
        self._preferred_temporality = inner._preferred_temporality
        self._preferred_aggregation = inner._preferred_aggregation

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kw: Any) -> Any:
        from opentelemetry.sdk.metrics.export import MetricExportResult

        try:
            if self._extra is not None:
                metrics_data = self._merge(metrics_data)
            res = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kw)
        except Exception:  # noqa: BLE001
            res = MetricExportResult.FAILURE
        self._on_result(res == MetricExportResult.SUCCESS)
        return res

    def _merge(self, data: Any) -> Any:
        from opentelemetry.sdk.metrics import Histogram
        from opentelemetry.sdk.metrics.export import (AggregationTemporality, MetricsData, ResourceMetrics,
                                                      ScopeMetrics)

        extra = self._extra.metrics(self._preferred_temporality.get(Histogram, AggregationTemporality.CUMULATIVE))
        if not extra or not data.resource_metrics:
            return data
        rm = data.resource_metrics[0]
        scopes = list(rm.scope_metrics)
        for i, sm in enumerate(scopes):
            if sm.scope.name == self._scope.name:
                scopes[i] = ScopeMetrics(sm.scope, [*sm.metrics, *extra], sm.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self._scope, extra, ""))
        return MetricsData([ResourceMetrics(rm.resource, scopes, rm.schema_url), *data.resource_metrics[1:]])

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kw: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kw)
