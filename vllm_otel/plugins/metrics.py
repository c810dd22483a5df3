"""Plugin results and health as Prometheus series, computed at scrape time from the manager's state
(the plugins themselves run on the manager's thread, never inside a scrape)."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["PluginMetrics"]


class PluginMetrics:
    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def describe(self) -> list[Any]:
        return []  # values appear and vanish with plugins: no fixed description

    def collect(self) -> Iterator[Any]:
        m = self.manager
        value = GaugeMetricFamily("vllm_otel_plugin_value", "Latest numeric result of a collector or "
                                  "predictor plugin, per result key", labels=["plugin", "key"])
        up = GaugeMetricFamily("vllm_otel_plugin_up", "1 while the plugin runs, 0 when disabled or "
                               "failed to load", labels=["plugin", "type"])
        failures = CounterMetricFamily("vllm_otel_plugin_failures", "Plugin failures by stage (load, "
                                       "reload, initialize, execute, shutdown)", labels=["plugin", "stage"])
        reloads = CounterMetricFamily("vllm_otel_plugin_reloads", "Successful hot reloads of a plugin",
                                      labels=["plugin"])
        with m._lock:
            plugins = list(m.plugins.values())
            fails = dict(m.failures)
            rel = dict(m.reloads)
            failed_sources = [s for s in m.errors if not any(p.source == s for p in plugins)]
        for p in plugins:
            up.add_metric([p.name, p.plugin_type], 1.0 if p.state == "active" else 0.0)
            for k, v in p.last_result.items():
                value.add_metric([p.name, k], v)
        from pathlib import Path

        for s in failed_sources:
            up.add_metric([Path(s).stem, "unknown"], 0.0)
        for (name, stage), n in fails.items():
            failures.add_metric([name, stage], n)
        for name, n in rel.items():
            reloads.add_metric([name], n)
        yield from (value, up, failures, reloads)
