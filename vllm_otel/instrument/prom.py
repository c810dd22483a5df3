"""The ``vllm_otel_`` series vLLM lacks, published on vLLM's own ``/metrics``.

A custom prometheus_client Collector reads the monitor's state at scrape time, so the engine's
step path only writes plain integers. Labels follow vLLM's own (``model_name``, ``engine``);
Prometheus adds ``instance`` and ``job`` from the scrape target.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_otel.instrument.guard import hook_errors

__all__ = ["MonitorCollector"]


class MonitorCollector(Collector):
    def __init__(self, monitor: Any) -> None:
        self.m = monitor

    def describe(self) -> list:
        return []  # collect() is cheap and safe; an empty describe avoids a collect at register time

    def collect(self) -> Iterator[Any]:
        try:
            yield from self._collect()
        except Exception:  # noqa: BLE001 - a scrape must never fail because of us
            hook_errors["prometheus.collect"] += 1

    def _collect(self) -> Iterator[Any]:
        m = self.m
        lbl = ["model_name", "engine"]
        stalled = GaugeMetricFamily("vllm_otel_engine_stalled",
                                    "1 while requests are in flight and the engine produces no tokens", labels=lbl)
        progress = GaugeMetricFamily("vllm_otel_engine_last_progress_timestamp_seconds",
                                     "Unix time of the engine's last produced token", labels=lbl)
        report = GaugeMetricFamily("vllm_otel_engine_last_report_timestamp_seconds",
                                   "Unix time the engine last reported stats to the API server", labels=lbl)
        stalls = CounterMetricFamily("vllm_otel_engine_stalls", "Stalls detected", labels=lbl)
        aborted = CounterMetricFamily("vllm_otel_requests_aborted",
                                      "Aborted requests, client disconnects included (vLLM's own "
                                      "request_success_total misses those)", labels=lbl)
        finished = CounterMetricFamily("vllm_otel_requests_finished", "Finished requests by reason",
                                       labels=lbl + ["finish_reason"])
        headroom = GaugeMetricFamily("vllm_otel_kv_cache_headroom_tokens",
                                     "Tokens of KV cache still free (capacity x (1 - usage))", labels=lbl)
        timeout = GaugeMetricFamily("vllm_otel_stall_timeout_seconds",
                                    "Configured no-progress time before an engine counts as stalled")
        timeout.add_metric([], m.cfg.stall_timeout_s)
        for idx, e in list(m.engines.items()):
            v = [m.model_name, str(idx)]
            p = e.progress
            stalled.add_metric(v, 1.0 if p.stalled else 0.0)
            progress.add_metric(v, p.last_progress)
            report.add_metric(v, p.last_report)
            stalls.add_metric(v, p.stall_events)
            aborted.add_metric(v, e.aborted)
            for reason, n in list(e.finished.items()):
                finished.add_metric(v + [reason], n)
            if m.num_blocks:
                headroom.add_metric(v, max(0.0, 1.0 - e.kv_usage) * m.num_blocks * m.block_size)
        yield from (stalled, progress, report, stalls, aborted, finished, headroom, timeout)

        st = m.export_stats
        for name, counter, doc in (("vllm_otel_otlp_exported", st.exported, "Items/batches exported over OTLP"),
                                   ("vllm_otel_otlp_failed", st.failed, "Failed OTLP export batches"),
                                   ("vllm_otel_otlp_dropped", st.dropped,
                                    "Telemetry items dropped (queue full or failed export)")):
            fam = CounterMetricFamily(name, doc, labels=["signal"])
            for signal in ("traces", "metrics"):
                fam.add_metric([signal], counter.get(signal, 0))
            yield fam
        errs = CounterMetricFamily("vllm_otel_hook_errors", "Exceptions caught inside vllm-otel hooks",
                                   labels=["hook"])
        for hook, n in list(hook_errors.items()):
            errs.add_metric([hook], n)
        yield errs
