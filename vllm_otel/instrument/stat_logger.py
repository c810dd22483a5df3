"""The ``vllm.stat_logger_plugins`` entry point: vLLM hands us its per-step stats here.

Loaded by vLLM in the API-server process (async serving only) and instantiated once per engine
(``engine_index``). vLLM calls ``record()`` from its output-handler loop after every engine step,
so the method must be cheap and must never raise: each method is guarded.

The logger announces itself with ``vllm_otel_build_info`` on vLLM's own ``/metrics`` (the default
prometheus_client registry, which vLLM serves in single-API-server mode) and hands every step to
the process's :class:`~vllm_otel.instrument.monitor.EngineMonitor`, which turns it into OTel
metrics and spans, lifecycle states, stall detection and ``vllm_otel_`` series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_otel.instrument.guard import guarded, logger

__all__ = ["OtelStatLogger"]

_metrics: dict[int, tuple[Gauge, Counter]] = {}


def _instruments(registry: CollectorRegistry) -> tuple[Gauge, Counter]:
    # One set per registry: vLLM builds a logger per engine, and prometheus_client refuses to
    # register the same name twice.
    key = id(registry)
    if key not in _metrics:
        info = Gauge("vllm_otel_build_info", "vllm-otel plugin loaded in this vLLM API server (value 1)",
                     ["version", "vllm_version", "engine"], registry=registry)
        steps = Counter("vllm_otel_stat_records", "Engine step stats received by the vllm-otel stat logger",
                        ["engine"], registry=registry)
        _metrics[key] = (info, steps)
    return _metrics[key]


class OtelStatLogger(StatLoggerBase):
    """Per-engine stat logger; a no-op when monitoring is disabled."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, registry: CollectorRegistry | None = None):
        self.engine_index = engine_index
        self.enabled = False
        self._init(vllm_config, registry or REGISTRY)

    @guarded("stat_logger.init")
    def _init(self, vllm_config: Any, registry: CollectorRegistry) -> None:
        from vllm_otel.config import ConfigError, load_config

        try:
            cfg = load_config()
        except ConfigError as e:
            logger.warning("vllm-otel stat logger: %s; disabled", e)
            return
        if not cfg.enabled:
            return
        import vllm

        from vllm_otel import __version__

        info, self._steps = _instruments(registry)
        info.labels(version=__version__, vllm_version=getattr(vllm, "__version__", "unknown"),
                    engine=str(self.engine_index)).set(1)
        self._steps_child = self._steps.labels(engine=str(self.engine_index))
        from vllm_otel.instrument.monitor import ensure_monitor

        self.monitor = ensure_monitor(vllm_config, cfg, registry=registry)
        self.monitor.engine(self.engine_index)
        self.enabled = True

    @guarded("stat_logger.record")
    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if not self.enabled:
            return
        self._steps_child.inc()
        self.monitor.on_step(scheduler_stats, iteration_stats, self.engine_index)

    @guarded("stat_logger.record_sleep_state")
    def record_sleep_state(self, is_awake: int = 0, level: int = 0) -> None:
        # vLLM passes 1 after sleep() and 0 once fully awake (StatLoggerManager.record_sleep_state
        # names the argument "sleep"; the base class's "is_awake" is the inverse of its use).
        if self.enabled:
            self.monitor.on_sleep_state(is_awake, level, self.engine_index)

    @guarded("stat_logger.log_engine_initialized")
    def log_engine_initialized(self) -> None:
        if self.enabled:
            self.monitor.on_engine_initialized(self.engine_index)
            logger.info("vllm-otel stat logger active for engine %d", self.engine_index)
