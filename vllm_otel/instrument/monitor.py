"""The per-process monitor behind the stat logger and the status endpoints.

One :class:`EngineMonitor` lives in vLLM's API-server process (created by the first stat logger,
shared by every engine's logger and by the endpoint plugin). It owns:
- per-engine progress state, lifecycle tracker and stall detection;
- OTel instruments (GenAI server histograms, vLLM saturation) on a private MeterProvider, and
  per-request spans on a private TracerProvider, both exporting over OTLP when configured
  (:class:`~vllm_otel.instrument.instruments.MonitorInstruments`);
- the ``vllm_otel_`` series vLLM lacks, published on vLLM's own ``/metrics`` by a custom
  collector that reads state at scrape time (nothing is computed on vLLM's step path);
- the host/process and GPU collectors.

Per engine step the stat logger only writes a few integers here; per finished request it
records four histogram points and, with tracing on, one span tree.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from vllm_otel.config import MonitorConfig
from vllm_otel.instrument import semconv as sc
from vllm_otel.instrument.guard import guarded, hook_errors, logger
from vllm_otel.instrument import phases
from vllm_otel.instrument.lifecycle import INTERVENTION_STATES, END_STATES, STARTUP_STATES
from vllm_otel.instrument.lifecycle import LifecycleState as S
from vllm_otel.instrument.lifecycle import LifecycleTracker
from vllm_otel.instrument.requests import registry as request_registry
from vllm_otel.instrument.stall import ProgressState, StallDetector
from vllm_otel.instrument.instruments import MonitorInstruments
from vllm_otel.telemetry import ExportStats

__all__ = ["EngineMonitor", "get_monitor", "ensure_monitor"]

_lock = threading.Lock()
_monitor: "EngineMonitor | None" = None


def get_monitor() -> "EngineMonitor | None":
    return _monitor


def ensure_monitor(vllm_config: Any, cfg: MonitorConfig, registry: Any = None) -> "EngineMonitor":
    global _monitor
    with _lock:
        if _monitor is None or _monitor.pid != os.getpid():
            _monitor = EngineMonitor(vllm_config, cfg, registry=registry)
        return _monitor


def _server_address(argv: list[str]) -> tuple[str | None, int | None]:  # noqa: C901
    """Host and port of vLLM's API server from its command line (what tells instances apart)."""
    serving = any("api_server" in a for a in argv[:2]) or (len(argv) > 1 and argv[1] == "serve")
    host, port = None, (8000 if serving else None)
    for i, a in enumerate(argv):
        for flag in ("--host", "--port"):
            val = None
            if a == flag and i + 1 < len(argv):
                val = argv[i + 1]
            elif a.startswith(flag + "="):
                val = a.split("=", 1)[1]
            if val is not None:
                if flag == "--host":
                    host = val
                else:
                    try:
                        port = int(val)
                    except ValueError:
                        pass
    return host, port


class _Engine:
    def __init__(self, idx: int, tracker: LifecycleTracker) -> None:
        self.idx = idx
        self.tracker = tracker
        self.progress = ProgressState()
        self.kv_usage = 0.0
        self.preemptions = 0
        self.preemptions_seen = 0  # by the lifecycle tick
        self.finished: Counter[str] = Counter()
        self.aborted = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.steps = 0


class EngineMonitor:
    def __init__(self, vllm_config: Any, cfg: MonitorConfig, registry: Any = None) -> None:
        from prometheus_client import REGISTRY

        self.pid = os.getpid()
        self.cfg = cfg
        self.registry = REGISTRY if registry is None else registry
        self.started = time.time()
        self.model_name = self._model_name(vllm_config)
        host, port = _server_address(sys.argv)
        self.server_address, self.server_port = host, port
        # Offline (no server port): host:pid still tells processes apart.
        self.instance = cfg.instance or f"{host or socket.gethostname()}:{port or os.getpid()}"
        cache = getattr(vllm_config, "cache_config", None)
        self.block_size = getattr(cache, "block_size", None) or 16
        self.num_blocks = getattr(cache, "num_gpu_blocks", None)
        obs = getattr(vllm_config, "observability_config", None)
        self.vllm_tracing = bool(getattr(obs, "otlp_traces_endpoint", None))
        self.parallel = self._parallel(vllm_config)
        self.engines: dict[int, _Engine] = {}
        self.recent_stalls: deque[dict[str, Any]] = deque(maxlen=50)
        self.export_stats = ExportStats()
        self._attr_cache: dict[tuple, tuple] = {}
        self._closed = False
        self.otel = otel = MonitorInstruments(
            self.engines, self.export_stats, instance=self.instance, model_name=self.model_name,
            parallel=self.parallel, server_address=host, server_port=port, vllm_tracing=self.vllm_tracing)
        # Bound here, not read through self.otel: the per-request path takes no extra hop.
        self.request_spans, self.meter_provider = otel.request_spans, otel.meter_provider
        self.h_duration, self.h_ttft, self.h_tpot = otel.h_duration, otel.h_ttft, otel.h_tpot
        self.h_tokens, self.h_queue = otel.h_tokens, otel.h_queue
        self._setup_prometheus()
        self.stall = StallDetector(lambda: {i: e.progress for i, e in self.engines.items()},
                                   cfg.stall_timeout_s,
                                   pending_since=lambda since: request_registry.oldest_received(
                                       max(10 * cfg.stall_timeout_s, 300.0), since=since),
                                   on_change=self._on_stall_change)
        self._tick_stop = threading.Event()
        self._tick = threading.Thread(target=self._lifecycle_loop, name="vllm-otel-lifecycle", daemon=True)
        self.stall.start()
        self._tick.start()
        phases.subscribe(self._on_phase)  # READY, shutdown and engine death arrive later
        import atexit

        atexit.register(self.shutdown)  # flush spans and metrics when vLLM exits
        logger.info("vllm-otel monitor up in pid %d: model=%s instance=%s otlp traces=%s metrics=%s",
                    self.pid, self.model_name, self.instance, otel.settings.traces_enabled,
                    otel.settings.metrics_enabled)

    # ---- set-up ------------------------------------------------------------------------------
    @staticmethod
    def _model_name(vllm_config: Any) -> str:
        mc = getattr(vllm_config, "model_config", None)
        name = getattr(mc, "served_model_name", None) or getattr(mc, "model", None) or "unknown"
        return name[0] if isinstance(name, (list, tuple)) else str(name)

    @staticmethod
    def _parallel(vllm_config: Any) -> dict[str, int]:
        pc = getattr(vllm_config, "parallel_config", None)
        return {k: int(getattr(pc, k, 1) or 1) for k in
                ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")}

    def _setup_prometheus(self) -> None:
        from vllm_otel.instrument.prom import MonitorCollector

        self.collector = MonitorCollector(self)
        self._register(self.collector)
        self.gpu = self.host = None
        try:
            from vllm_otel.instrument.host import ProcessCollector

            # instance="" lets Prometheus' own target label name the instance.
            self.host = ProcessCollector(instance="", registry=None)
            self._register(self.host)
        except Exception:  # noqa: BLE001
            logger.warning("vllm-otel: host collector unavailable", exc_info=True)
        try:
            from vllm_otel.instrument.gpu import GpuCollector

            self.gpu = GpuCollector(instance="", engine="0", registry=None).start()
            self._register(self.gpu)
        except Exception:  # noqa: BLE001
            logger.warning("vllm-otel: GPU collector unavailable", exc_info=True)

    def _register(self, collector: Any) -> None:
        try:
            self.registry.register(collector)
        except ValueError:
            logger.debug("vllm-otel: collector %r already registered", collector)

    # ---- engines -------------------------------------------------------------------------------
    def engine(self, idx: int) -> _Engine:
        eng = self.engines.get(idx)
        if eng is None:
            # Initializing began when this process did; every later state from vLLM's own records.
            tracker = LifecycleTracker(instance="", engine_index=idx, registry=self.registry,
                                       started_at=phases.process_start_time())
            if self.otel.tracer is not None:
                from vllm_otel.instrument.lifecycle import span_event_listener

                tracker.add_listener(span_event_listener(self.otel.tracer))
            eng = self.engines[idx] = _Engine(idx, tracker)
            for phase in phases.collect():
                self._apply_phase(eng, phase)
            tracker.track_startup(arguments={"argv": sys.argv[1:]}, environment=None, hardware_info=None)
        return eng

    def _apply_phase(self, eng: _Engine, phase: phases.Phase) -> None:
        # An engine core's records name no engine index: claimed only where there is one engine.
        if phase.pid != self.pid and self.parallel.get("data_parallel_size", 1) != 1:
            return
        if phase.state is S.READY and eng.tracker.state not in STARTUP_STATES:
            return  # already serving (the first step came first)
        eng.tracker.transition(phase.state, reason=phase.reason, at=phase.at,
                               pid=phase.pid)

    @guarded("monitor.on_phase")
    def _on_phase(self, phase: phases.Phase) -> None:
        for eng in list(self.engines.values()):
            self._apply_phase(eng, phase)

    def on_engine_initialized(self, idx: int) -> None:
        eng = self.engine(idx)
        eng.progress.last_report = eng.progress.last_progress = time.time()

    @guarded("monitor.ready")
    def ready(self, reason: str) -> None:
        """The engine can take requests (offline: LLMEngine built); no-op once past start-up."""
        for eng in list(self.engines.values()):
            if eng.tracker.state in STARTUP_STATES:
                eng.tracker.transition(S.READY, reason=reason)

    @guarded("monitor.intervention")
    def intervention(self, state: S, reason: str) -> None:
        """The control endpoint acted: enter ``state`` (paused, draining, waking) now."""
        for eng in list(self.engines.values()):
            # Paused on purpose: silence from here on is the operator's, not a stall. (A drain
            # still steps: a stall while draining is a stall.)
            eng.progress.held = state is S.PAUSED
            eng.tracker.transition(state, reason=reason)

    @guarded("monitor.resume")
    def resume(self, reason: str, ending: frozenset[S] = INTERVENTION_STATES) -> None:
        """An intervention (one of ``ending``) ended: back to the serving state the load says."""
        for eng in list(self.engines.values()):
            if eng.tracker.state in ending:
                eng.progress.last_progress = eng.progress.last_report = time.time()
                eng.progress.held = False
                eng.tracker.transition(self._serving_state(eng), reason=reason)

    @guarded("monitor.on_sleep_state")
    def on_sleep_state(self, sleeping: int, level: int, idx: int) -> None:
        """vLLM's own report (``StatLoggerBase.record_sleep_state``) after sleep and wake-up."""
        eng = self.engines.get(idx)
        if eng is None:
            return
        if sleeping:
            eng.progress.held = True
            eng.tracker.transition(S.SLEEPING, reason=f"vLLM reports sleep level {level}")
        else:
            eng.progress.last_progress = eng.progress.last_report = time.time()
            eng.progress.held = False
            eng.tracker.transition(self._serving_state(eng), reason="vLLM reports awake")

    def on_step(self, scheduler_stats: Any, iteration_stats: Any, idx: int) -> None:
        eng = self.engines.get(idx) or self.engine(idx)
        now = time.time()
        p = eng.progress
        p.last_report = now
        eng.steps += 1
        if scheduler_stats is not None:
            p.running = scheduler_stats.num_running_reqs
            p.waiting = scheduler_stats.num_waiting_reqs
            eng.kv_usage = scheduler_stats.kv_cache_usage
            pcs = scheduler_stats.prefix_cache_stats
            if pcs is not None and pcs.queries:
                eng.prefix_queries += pcs.queries
                eng.prefix_hits += pcs.hits
        if iteration_stats is None:
            return
        if iteration_stats.num_generation_tokens:
            p.last_progress = now
        if iteration_stats.num_preempted_reqs:
            eng.preemptions += iteration_stats.num_preempted_reqs
        for fin in iteration_stats.finished_requests:
            self._on_finished(eng, fin, iteration_stats.iteration_timestamp)

    def _on_finished(self, eng: _Engine, fin: Any, end_s: float) -> None:
        reason = str(getattr(fin.finish_reason, "name", fin.finish_reason)).lower()
        eng.finished[reason] += 1
        eng.progress.last_progress = time.time()
        info = request_registry.pop(fin.request_id)
        if reason == "abort":
            eng.aborted += 1
        ids = None
        if self.request_spans is not None:
            ids = self.request_spans.record(fin, end_s, eng.idx, info)
        if self.meter_provider is None:
            return
        failed = reason in ("abort", "error")
        attrs, queue_attrs, tokens_in, tokens_out = self._attrs(info.operation if info else sc.DEFAULT_OPERATION,
                                                                 "aborted" if reason == "abort" else
                                                                 "error" if failed else None, eng.idx)
        self.h_duration.record(fin.e2e_latency, attrs, ids)
        self.h_queue.record(max(fin.queued_time, 0.0), queue_attrs, ids)
        if fin.num_generation_tokens > 0 and not failed:
            self.h_ttft.record(max(fin.e2e_latency - fin.decode_time, 0.0), attrs, ids)
            if fin.num_generation_tokens > 1:
                self.h_tpot.record(fin.mean_time_per_output_token, attrs, ids)
        self.h_tokens.record(fin.num_prompt_tokens, tokens_in, ids)
        self.h_tokens.record(fin.num_generation_tokens, tokens_out, ids)

    def _attrs(self, op: str, error: str | None, idx: int) -> tuple:
        """Attribute tuples of the request histograms, built once per (operation, error, engine)."""
        key = (op, error, idx)
        got = self._attr_cache.get(key)
        if got is None:
            base = ((sc.OPERATION_NAME, op), (sc.PROVIDER_NAME, sc.PROVIDER), (sc.REQUEST_MODEL, self.model_name),
                    (sc.RESPONSE_MODEL, self.model_name), (sc.ENGINE, idx)) + (((sc.ERROR_TYPE, error),) if error else ())
            got = self._attr_cache[key] = (base, ((sc.ENGINE, idx),), base + ((sc.TOKEN_TYPE, "input"),),
                                           base + ((sc.TOKEN_TYPE, "output"),))
        return got

    @guarded("monitor.on_client_abort")
    def on_client_abort(self, external_ids: list[str], idx: int = 0) -> None:
        """Requests aborted in the front end (client went away): vLLM's stats never see them."""
        eng = self.engines.get(idx) or self.engine(idx)
        eng.aborted += len(external_ids)
        eng.finished["abort"] += len(external_ids)
        for rid in external_ids:
            request_registry.pop(rid)

    # ---- lifecycle and stall ---------------------------------------------------------------------
    def _on_stall_change(self, idx: int, stalled: bool, why: str) -> None:
        eng = self.engines.get(idx)
        if eng is None:
            return
        if eng.progress.held or eng.tracker.state in END_STATES:
            return  # held by the operator or going away: not a stall of its own
        if stalled:
            logger.warning("vllm-otel: engine %d stalled: %s", idx, why)
            self.recent_stalls.append({"engine": idx, "at": time.time(), "why": why})
            eng.tracker.transition(S.STALLED, reason=why)
        else:
            logger.warning("vllm-otel: engine %d resumed: %s", idx, why)
            eng.tracker.transition(self._serving_state(eng), reason=why)

    def _serving_state(self, eng: _Engine) -> S:
        p = eng.progress
        if p.stalled:
            return S.STALLED
        if eng.preemptions > eng.preemptions_seen:
            return S.PREEMPTING
        if p.waiting > 0 and eng.kv_usage >= 0.9:
            return S.SATURATED
        if p.running + p.waiting > 0:
            return S.SERVING
        return S.IDLE

    def _lifecycle_loop(self) -> None:
        # Once a second, not per step: a state per step would flap and flood the history.
        while not self._tick_stop.wait(1.0):
            try:
                for eng in list(self.engines.values()):
                    if eng.tracker.state in STARTUP_STATES and eng.steps:
                        # vLLM's READY record was not seen (a quieter log level): its first
                        # step is the proof that it serves.
                        eng.tracker.transition(S.READY, reason="the engine took its first step")
                    if eng.tracker.state in (S.STALLED,) or eng.tracker.state not in _SERVING:
                        continue
                    eng.tracker.transition(self._serving_state(eng), reason="load changed")
                    eng.preemptions_seen = eng.preemptions
            except Exception:  # noqa: BLE001
                hook_errors["monitor.lifecycle_loop"] += 1

    # ---- status ------------------------------------------------------------------------------------
    def get_engine_status(self) -> dict[str, Any]:
        engines = {}
        for i, e in list(self.engines.items()):
            p = e.progress
            engines[str(i)] = {
                "lifecycle_state": e.tracker.state.value if e.tracker.state else None,
                "running_requests": p.running, "waiting_requests": p.waiting,
                "kv_cache_usage": e.kv_usage, "stalled": p.stalled, "stall_events": p.stall_events,
                "seconds_since_progress": round(time.time() - p.last_progress, 3),
                "preemptions": e.preemptions, "aborted_requests": e.aborted,
                "finished_requests": dict(e.finished), "steps": e.steps,
            }
        active = sum(e.progress.running + e.progress.waiting for e in self.engines.values())
        return {
            "instance": self.instance, "model": self.model_name, "pid": self.pid,
            "uptime_s": round(time.time() - self.started, 3), "active_requests": active,
            "engines": engines, "parallel": self.parallel, "recent_stalls": list(self.recent_stalls),
            "recent_predictions": [], "recent_mitigations": [],  # filled by the forecaster / receiver
            "otlp": {"traces": self.otel.settings.traces_enabled and not self.vllm_tracing,
                     "metrics": self.otel.settings.metrics_enabled, "vllm_native_tracing": self.vllm_tracing,
                     "dropped": dict(self.export_stats.dropped), "failed": dict(self.export_stats.failed),
                     "exported": dict(self.export_stats.exported)},
            "hook_errors": dict(hook_errors),
        }

    def get_lifecycle(self) -> dict[str, Any]:
        return {str(i): json.loads(e.tracker.to_json()) for i, e in list(self.engines.items())}

    def export_data(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write status and lifecycle history as one JSON file; returns its path."""
        out = Path(path) if path else Path(f"vllm_otel_export_{self.pid}_{int(time.time())}.json")
        out.write_text(json.dumps({"status": self.get_engine_status(), "lifecycle": self.get_lifecycle(),
                                   "exported_at": time.time()}, indent=2, default=str))
        return out

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stall.stop()
        self._tick_stop.set()
        phases.unsubscribe(self._on_phase)
        for e in self.engines.values():
            if e.tracker.state not in (S.SHUTTING_DOWN, S.CRASHED):
                e.tracker.transition(S.SHUTTING_DOWN, reason="process exiting without vLLM's "
                                                             "shutdown record")
            # Before the providers flush: the trace backend gets this last transition.
            e.tracker.transition(S.STOPPED, reason="process exiting")
        if self.gpu is not None:
            self.gpu.stop()
        self.otel.shutdown()


_SERVING = {S.IDLE, S.SERVING, S.SATURATED, S.PREEMPTING, S.READY}
