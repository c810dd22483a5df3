"""The monitor's OpenTelemetry side: providers, request histograms, engine observables, spans.

Built once per process by :class:`~vllm_otel.instrument.monitor.EngineMonitor`. Everything here
is private to vllm-otel (no global provider is installed) and exports over OTLP when the
``OTEL_*`` settings ask for it. The observable counters and gauges read the integers the monitor
keeps per engine anyway, at collection time: nothing is computed on vLLM's step path.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from vllm_otel.instrument import semconv as sc
from vllm_otel.telemetry import (ExportStats, OtelSettings, build_meter_provider, build_resource,
                                 build_tracer_provider)

__all__ = ["MonitorInstruments"]

# name, counter (else gauge), unit, description, the value of one engine's state
_OBSERVED: tuple[tuple[str, bool, str, str, Callable[[Any], float]], ...] = (
    ("vllm.preemptions", True, "{preemption}", "Requests preempted by the scheduler",
     lambda e: e.preemptions),
    # Aborted (finish reason "abort" and client disconnects) plus engine errors.
    ("vllm.requests.aborted", True, "{request}", "Requests aborted (client disconnects included)",
     lambda e: e.aborted + e.finished["error"]),
    ("vllm.prefix_cache.queries", True, "{token}", "Prefix-cache lookups in tokens",
     lambda e: e.prefix_queries),
    ("vllm.prefix_cache.hits", True, "{token}", "Prefix-cache hits in tokens", lambda e: e.prefix_hits),
    ("vllm.kv_cache.usage", False, "1", "KV-cache usage, 1 = full", lambda e: e.kv_usage),
    ("vllm.requests.running", False, "{request}", "Requests in the running batch",
     lambda e: e.progress.running),
    ("vllm.requests.waiting", False, "{request}", "Requests waiting to be scheduled",
     lambda e: e.progress.waiting),
    ("vllm.engine.stalled", False, "1", "1 while the engine makes no forward progress",
     lambda e: int(e.progress.stalled)),
)


def _observer(engines: Mapping[int, Any], value: Callable[[Any], float]) -> Callable[[Any], list[Any]]:
    from opentelemetry.metrics import Observation

    def observe(_opts: Any) -> list[Any]:
        return [Observation(value(e), {sc.ENGINE: i}) for i, e in list(engines.items())]

    return observe


class MonitorInstruments:
    """OTel resource, meter and tracer providers, request histograms and request spans.

    ``meter_provider`` is None without OTLP metrics (then there are no histograms either);
    ``tracer_provider``, ``tracer`` and ``request_spans`` are None without OTLP traces or when
    vLLM traces requests itself (``vllm_tracing``).
    """

    def __init__(self, engines: Mapping[int, Any], export_stats: ExportStats, *, instance: str,
                 model_name: str, parallel: Mapping[str, int], server_address: str | None,
                 server_port: int | None, vllm_tracing: bool) -> None:
        self.settings = OtelSettings.from_env()
        self.resource = None
        self.meter_provider = None
        self.tracer_provider = None
        self.span_processor = None
        self.request_spans = None
        self.tracer = None
        self.histograms = None
        self.h_duration = self.h_ttft = self.h_tpot = self.h_tokens = self.h_queue = None
        if not (self.settings.metrics_enabled or self.settings.traces_enabled):
            return
        import vllm

        from vllm_otel import __version__

        self.resource = build_resource({
            "service.instance.id": instance, "vllm.model.name": model_name,
            "vllm.version": getattr(vllm, "__version__", "unknown"), "vllm_otel.version": __version__,
            "vllm.tensor_parallel_size": parallel["tensor_parallel_size"],
            "vllm.pipeline_parallel_size": parallel["pipeline_parallel_size"],
            "vllm.data_parallel_size": parallel["data_parallel_size"],
        })
        self._setup_metrics(engines, export_stats, __version__)
        tp = None if vllm_tracing else build_tracer_provider(self.settings, self.resource, export_stats)
        if tp is not None:
            from vllm_otel.instrument.tracing import RequestSpans
            from vllm_otel.telemetry import send_encoded

            self.tracer_provider, self.span_processor = tp
            self.tracer = self.tracer_provider.get_tracer("vllm_otel", __version__)
            self.request_spans = RequestSpans(
                self.tracer_provider.sampler, send_encoded(self.span_processor.exporter), export_stats,
                self.resource, ("vllm_otel", __version__), model_name, server_address, server_port)

    def _setup_metrics(self, engines: Mapping[int, Any], export_stats: ExportStats, version: str) -> None:
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from vllm_otel.telemetry import HistogramSet

        # Histograms aggregated here, sent with the SDK's metrics (see telemetry.histograms).
        histograms = HistogramSet()
        mp = build_meter_provider(self.settings, self.resource, export_stats, histograms=histograms,
                                  scope=InstrumentationScope("vllm_otel", version))
        if mp is None:
            return
        self.meter_provider, self.histograms = mp, histograms
        h = histograms.histogram
        self.h_duration = h(sc.REQUEST_DURATION, "s", "Generative AI server request duration",
                            sc.REQUEST_DURATION_BUCKETS)
        self.h_ttft = h(sc.TIME_TO_FIRST_TOKEN, "s", "Time to generate first token for successful responses",
                        sc.TIME_TO_FIRST_TOKEN_BUCKETS)
        self.h_tpot = h(sc.TIME_PER_OUTPUT_TOKEN, "s", "Time per output token generated after the first token",
                        sc.TIME_PER_OUTPUT_TOKEN_BUCKETS)
        self.h_tokens = h(sc.TOKEN_USAGE, "{token}", "Number of input and output tokens used",
                          sc.TOKEN_USAGE_BUCKETS)
        self.h_queue = h("vllm.request.queue.duration", "s", "Time a request waited in vLLM's scheduler queue",
                         sc.TIME_TO_FIRST_TOKEN_BUCKETS)
        m = mp.get_meter("vllm_otel", version)
        for name, counter, unit, description, value in _OBSERVED:
            create = m.create_observable_counter if counter else m.create_observable_gauge
            create(name, [_observer(engines, value)], unit=unit, description=description)

    def shutdown(self) -> None:
        if self.request_spans is not None:
            self.request_spans.shutdown()  # flushed before the exporter it shares closes
        for p in (self.meter_provider, self.tracer_provider):
            if p is not None:
                try:
                    p.shutdown()
                except Exception:  # noqa: BLE001
                    pass
