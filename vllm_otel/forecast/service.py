"""The long-running forecaster: fetch on a schedule, step the detector, publish the latest predictions.

One cycle (:meth:`ForecasterService.run_cycle`), every ``interval_s``, in one thread:

1. **fetch** the new points from the source (:mod:`~vllm_otel.forecast.sources`). If the source
   fails (down, slow, garbage) nothing is invented: the last predictions stay published, every
   unit is marked stale, ``vllm_otel_forecaster_up`` goes to 0 and the data age keeps growing.
2. **step** the detector once per new time point; only the last point predicts and spends the
   refit budget (``refit_time_budget_s``, by default half the interval), so refits happen here on
   the cycle's schedule and never in a scrape handler. A jump in time (a scrape outage) is given
   to the detector as gap steps, so its models restart rather than bridge a hole they never saw.
3. **update** what is published per unit: a unit with data at the last point gets its fresh
   predictions (failure types without a prediction, e.g. too little data, are left out rather
   than guessed); a unit without keeps its last predictions, marked stale; a unit whose newest
   sample is older than the instance TTL is dropped. The result is swapped in as one immutable
   :class:`~vllm_otel.forecast.publish.Snapshot`, which ``/metrics`` and OTLP only read.

Counter resets (vLLM restarts), NaN samples and instances coming and going are handled where the
data is read (:mod:`~vllm_otel.forecast.signals`, :class:`~vllm_otel.forecast.detector.PredictiveFailureDetector`);
the service only has to pass gaps on faithfully.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np
from prometheus_client import CollectorRegistry
from scipy.special import ndtri

from vllm_otel.forecast.detector import PredictiveFailureDetector
from vllm_otel.forecast.detector_config import DetectorConfig
from vllm_otel.forecast.results import SOURCES, StepResult
from vllm_otel.forecast.publish import ForecastCollector, MetricsServer, ServiceMetrics, Snapshot, UnitForecast
from vllm_otel.forecast.signals import HistogramInput
from vllm_otel.forecast.sources import Batch, Source, SourceError

__all__ = ["ForecasterService", "CycleReport", "QUANTILES"]

log = logging.getLogger("vllm_otel.forecast")

# Quantiles of vllm_otel_forecast (labels as published).
QUANTILES: tuple[str, ...] = ("0.1", "0.5", "0.9")


@dataclass
class CycleReport:
    """What one cycle did (for logs, ``--once`` and tests)."""

    t: float
    ok: bool                                   # the source answered
    points: int = 0                            # time points stepped
    gap_steps: int = 0                         # steps without data inserted for missed time points
    units: int = 0                             # units with fresh data at the last point
    refits: int = 0
    duration_s: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)   # (stage, message)


@dataclass
class _UnitState:
    unit: str
    instance: str
    engine: str
    model_name: str
    last_data_t: float
    published: UnitForecast | None = None


class ForecasterService:
    """Runs the detector over a :class:`~vllm_otel.forecast.sources.Source` and publishes the results.

    ``config``: the detector's (a :class:`DetectorConfig` or its dict); ``interval_s`` becomes its
    ``step_s`` (the detector's windows assume one observation per step); ``instance_ttl_s`` how
    long a unit without data stays published (also the detector's ``forget_after_s``; default
    that). ``registry``: where the metrics live (a fresh one by default). ``clock``: wall time,
    replaceable in tests.
    """

    def __init__(self, source: Source, config: DetectorConfig | Mapping[str, Any] | None = None, *,
                 interval_s: float | None = None, instance_ttl_s: float | None = None,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time) -> None:
        cfg = DetectorConfig.model_validate(config or {})
        updates: dict[str, Any] = {}
        if interval_s is not None:
            updates["step_s"] = float(interval_s)
        if instance_ttl_s is not None:
            updates["forget_after_s"] = float(instance_ttl_s)
        step_s = float(updates.get("step_s", cfg.step_s))
        if cfg.refit_time_budget_s is None:
            updates["refit_time_budget_s"] = 0.5 * step_s  # leave the other half of the cycle for the rest
        if updates:
            cfg = DetectorConfig.model_validate({**cfg.model_dump(), **updates})
        self.config = cfg
        self.interval_s = cfg.step_s
        self.instance_ttl_s = cfg.forget_after_s
        self.source = source
        self.clock = clock
        self.detector = PredictiveFailureDetector(cfg)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServiceMetrics(self.registry)
        self.collector = ForecastCollector(lambda: self.snapshot, clock, registry=self.registry)
        self.snapshot = Snapshot(t=None, up=False, horizon_s=cfg.horizon_s,
                                 failure_types=self.detector.failure_types)
        self._units: dict[str, _UnitState] = {}
        self._last_step_t: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: MetricsServer | None = None
        self.last_report: CycleReport | None = None
        self.last_result: StepResult | None = None  # the detector's last predicting step (inspection)
        self._zq = {q: float(ndtri(float(q))) for q in QUANTILES}
        self._logged: dict[tuple[str, str], str] = {}

    # -- one cycle -----------------------------------------------------------------------------
    def run_cycle(self) -> CycleReport:
        """Fetch, step, publish. Never raises for bad data or a failing source."""
        t0 = time.perf_counter()
        now = self.clock()
        report = CycleReport(t=now, ok=False)
        try:
            batch = self.source.fetch(now)
        except SourceError as e:
            self._error(report, "source", str(e))
            batch = None
        except Exception as e:  # noqa: BLE001 - a source bug must not end the service
            log.exception("vllm-otel forecaster: source failed unexpectedly")
            self._error(report, "source", f"{type(e).__name__}: {e}")
            batch = None
        fresh: set[str] = set()
        if batch is not None:
            report.ok = True
            self._recovered("source")
            failed = {target for target, _ in batch.errors}
            for target, why in batch.errors:
                self._error(report, "target", f"{target}: {why}", key=target)
            for stage, key in [k for k in self._logged if k[0] == "target" and k[1] not in failed]:
                self._recovered(stage, key)
            try:
                fresh = self._ingest(batch, report)
            except Exception as e:  # noqa: BLE001
                log.exception("vllm-otel forecaster: detector step failed")
                self._error(report, "detector", f"{type(e).__name__}: {e}")
        self._publish(now, report.ok, fresh, report)
        report.duration_s = time.perf_counter() - t0
        self.metrics.cycle.observe(report.duration_s)
        self.metrics.cycles.inc()
        self.last_report = report
        return report

    def _error(self, report: CycleReport, stage: str, message: str, key: str = "") -> None:
        self.metrics.errors.labels(stage=stage).inc()
        report.errors.append((stage, message))
        # One warning when a problem starts or changes, not one per cycle while it lasts.
        level = logging.DEBUG if self._logged.get((stage, key)) == message else logging.WARNING
        self._logged[(stage, key)] = message
        log.log(level, "vllm-otel forecaster: %s: %s", stage, message)

    def _recovered(self, stage: str, key: str = "") -> None:
        if self._logged.pop((stage, key), None) is not None:
            log.warning("vllm-otel forecaster: %s%s: working again", stage, f" {key}" if key else "")

    def _ingest(self, batch: Batch, report: CycleReport) -> set[str]:
        """Step the detector through the batch's new points; returns the units fresh at the last one."""
        frame = batch.frame
        if batch.empty:
            return set()
        det = self.detector
        present = frame.present()
        order = [k for k in range(len(frame.t))
                 if self._last_step_t is None or frame.t[k] > self._last_step_t + 1e-6]
        if not order:
            return set()
        index = {u: i for i, u in enumerate(frame.units)}
        seen_t: dict[int, float] = {}
        res: StepResult | None = None
        refits_before = det.refits
        for n, k in enumerate(order):
            t = float(frame.t[k])
            report.gap_steps += self._gap_steps(t)
            last = n == len(order) - 1
            have = [i for i in range(len(frame.units)) if present[i, k]]
            for i in have:
                seen_t[i] = t
            # Units followed but without data now get a NaN row: a gap the detector counts. Units
            # gone for longer than forget_after_s are forgotten first, or the NaN row revives them.
            det.forget_stale(t)
            known = det.instances
            sel = have + [index[u] for u in known if u in index and not present[index[u], k]]
            extra = [u for u in known if u not in index]
            units = [frame.units[i] for i in sel] + extra
            if not units:
                continue
            values, hists = frame.at(k, np.array(sel, dtype=np.int64))
            if extra:
                values, hists = _pad(values, hists, len(extra))
            res = det.step(t, units, values, hists, predict=last, refit=last)
            self._last_step_t = t
            report.points += 1
        report.refits = det.refits - refits_before
        self.metrics.refits.inc(report.refits)
        for i, t in seen_t.items():
            u, inst = frame.units[i], frame.instances[i]
            st = self._units.get(u)
            model = batch.model_names.get(inst, st.model_name if st else "")
            if st is None:
                self._units[u] = _UnitState(u, inst, _engine(u, inst), model, t)
            else:
                st.last_data_t, st.model_name = max(st.last_data_t, t), model or st.model_name
        if res is None:
            return set()
        self.last_result = res
        fresh_idx = [j for j, u in enumerate(res.units) if u in index and present[index[u], order[-1]]]
        self._take_predictions(res, fresh_idx, report)
        report.units = len(fresh_idx)
        return {res.units[j] for j in fresh_idx}

    def _gap_steps(self, t: float) -> int:
        """NaN steps for the time points missed since the last step (a scrape outage, a slow cycle)."""
        if self._last_step_t is None:
            return 0
        step_s = self.config.step_s
        missed = int(math.floor((t - self._last_step_t) / step_s + 0.5)) - 1
        if missed <= 0 or not self.detector.instances:
            return 0
        # Beyond max_gap_s the detector restarts a series anyway: more gap steps would change nothing.
        cap = int(self.config.max_gap_s / step_s) + 2
        done = 0
        for j in range(max(1, missed - cap + 1), missed + 1):
            tj = t - (missed + 1 - j) * step_s
            self.detector.forget_stale(tj)
            if self.detector.instances:
                self.detector.step(tj, self.detector.instances, {}, None, predict=False, refit=False)
                done += 1
        self._last_step_t = t - step_s
        return done

    def _take_predictions(self, res: StepResult, rows: list[int], report: CycleReport) -> None:
        forecasts = self._forecasts(res, rows, report)
        for j in rows:
            u = res.units[j]
            st = self._units.get(u)
            if st is None:
                continue
            prob: dict[str, float] = {}
            ttf: dict[str, float] = {}
            src: dict[str, str] = {}
            for c, f in enumerate(res.failure_types):
                p = float(res.probability[j, c])
                if not math.isfinite(p):
                    continue  # too little data, or the threshold is not known: no prediction
                prob[f] = min(max(p, 0.0), 1.0)
                src[f] = SOURCES[int(res.source[j, c])]
                s = float(res.time_to_failure[j, c])
                if math.isfinite(s):
                    ttf[f] = s
            st.published = UnitForecast(unit=u, instance=st.instance, engine=st.engine,
                                        model_name=st.model_name, last_data_t=st.last_data_t, stale=False,
                                        predicted_at=res.t, probability=prob, time_to_failure=ttf,
                                        source=src, forecast=forecasts.get(j, {}))

    def _forecasts(self, res: StepResult, rows: list[int],
                   report: CycleReport) -> dict[int, dict[tuple[str, str], float]]:
        """Each forecast signal's quantiles at the horizon, where the model has enough data."""
        out: dict[int, dict[tuple[str, str], float]] = {}
        det, cfg = self.detector, self.config
        try:
            ids = np.array([det._rows[res.units[j]] for j in rows], dtype=np.int64)  # noqa: SLF001
            if not len(ids):
                return out
            H = det.horizon_steps
            for sig, bank in det.banks.items():
                ok = (bank.nobs[ids] >= cfg.min_points) & (bank.gap[ids] <= 1)
                if not ok.any():
                    continue
                mean, std = bank.forecast(ids[ok], H)
                m, s = mean[:, -1], std[:, -1]
                for r, jj in enumerate(np.flatnonzero(ok)):
                    if not (np.isfinite(m[r]) and np.isfinite(s[r])):
                        continue
                    d = out.setdefault(rows[jj], {})
                    for q, z in self._zq.items():
                        v = m[r] + z * s[r]
                        d[(sig, q)] = float(np.exp(v) if sig in cfg.log_signals else v)
        except Exception as e:  # noqa: BLE001 - the quantiles are extra; predictions still publish
            log.debug("forecast quantiles failed", exc_info=True)
            self._error(report, "forecast", f"{type(e).__name__}: {e}")
        return out

    def _publish(self, now: float, up: bool, fresh: set[str], report: CycleReport) -> None:
        ttl = self.instance_ttl_s
        for u in [u for u, st in self._units.items() if now - st.last_data_t > ttl]:
            log.info("vllm-otel forecaster: %s: no data for %.0f s, dropped", u, now - self._units[u].last_data_t)
            del self._units[u]
        units: list[UnitForecast] = []
        for u, st in sorted(self._units.items()):
            pub = st.published
            if pub is None:  # seen, never predicted yet: ages and staleness only
                pub = UnitForecast(unit=u, instance=st.instance, engine=st.engine, model_name=st.model_name,
                                   last_data_t=st.last_data_t, stale=u not in fresh, predicted_at=None)
            else:
                pub = replace(pub, last_data_t=st.last_data_t, stale=u not in fresh, model_name=st.model_name)
            if st.published is not None:
                st.published = pub
            units.append(pub)
        last_error = report.errors[-1][1] if report.errors else None
        self.snapshot = Snapshot(t=self.clock(), up=up, horizon_s=self.config.horizon_s,
                                 failure_types=self.detector.failure_types, units=tuple(units),
                                 last_error=last_error)

    # -- running -------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Cycle every ``interval_s`` until ``stop`` is set. A cycle that overruns skips missed ticks."""
        stop = stop or self._stop
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                self.run_cycle()
            except Exception:  # noqa: BLE001 - run_cycle does not raise; belt and braces for the loop
                log.exception("vllm-otel forecaster: cycle failed")
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:
                next_at += math.ceil((now - next_at) / self.interval_s) * self.interval_s
            stop.wait(next_at - now)

    def start(self) -> "ForecasterService":
        """Run the cycle loop in a background thread (tests, embedding)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, name="vllm-otel-forecaster", daemon=True)
            self._thread.start()
        return self

    def serve(self, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
        """Start the ``/metrics`` + ``/healthz`` server (``port=0``: any free port)."""
        if self._server is None:
            self._server = MetricsServer(self.registry, self.health, host, port).start()
        return self._server

    def stop(self) -> None:
        """Stop the loop, the HTTP server and the source. Safe to call more than once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(10.0, 2 * self.interval_s))
            self._thread = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        try:
            self.source.close()
        except Exception:  # noqa: BLE001
            log.debug("closing the source failed", exc_info=True)

    def health(self) -> tuple[int, dict[str, Any]]:
        """200 while cycles run on schedule (even with the source down: then ``up`` is false), else 503."""
        snap = self.snapshot
        now = self.clock()
        timeout = getattr(self.source, "timeout", 5.0)
        limit = 3 * self.interval_s + 2 * float(timeout)
        age = None if snap.t is None else now - snap.t
        alive = age is not None and age <= limit
        status = "starting" if snap.t is None else ("ok" if snap.up and alive else "degraded" if alive
                                                   else "stalled")
        doc = {"status": status, "up": snap.up, "last_cycle_age_s": age, "instances": len(snap.units),
               "stale_instances": sum(1 for u in snap.units if u.stale), "last_error": snap.last_error}
        return (200 if status in ("ok", "degraded", "starting") else 503), doc

    # -- reports -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The published state as JSON: every unit with every failure type (null: no prediction)."""
        snap = self.snapshot
        now = self.clock()
        actions = {f: list(self.detector.catalog.actions(f)) for f in snap.failure_types}
        out_units = []
        for u in snap.units:
            failures = {}
            for f in snap.failure_types:
                p = u.probability.get(f)
                failures[f] = {"probability": p, "time_to_failure_seconds": u.time_to_failure.get(f),
                               "source": u.source.get(f, "none"),
                               "status": "predicted" if p is not None else "no_prediction",
                               "recommended_actions": actions[f]}
            out_units.append({
                "unit": u.unit, "instance": u.instance, "engine": u.engine or None, "model_name": u.model_name,
                "data_age_seconds": max(0.0, now - u.last_data_t), "stale": u.stale,
                "predicted_at": u.predicted_at, "failures": failures,
                "forecast": [{"signal": s, "quantile": float(q), "value": v} for (s, q), v in u.forecast.items()],
            })
        report = self.last_report
        return {"t": snap.t, "source": getattr(self.source, "kind", type(self.source).__name__), "up": snap.up,
                "interval_s": self.interval_s, "horizon_s": snap.horizon_s,
                "failure_types": list(snap.failure_types), "instances": out_units,
                "errors": [{"stage": s, "message": m} for s, m in (report.errors if report else [])]}


def _engine(unit: str, instance: str) -> str:
    prefix = f"{instance}/engine="
    return unit[len(prefix):] if unit.startswith(prefix) else ""


def _pad(values: dict[str, np.ndarray], hists: dict[str, HistogramInput],
         n: int) -> tuple[dict[str, np.ndarray], dict[str, HistogramInput]]:
    """Append ``n`` all-NaN rows (units the detector follows that this batch does not hold)."""
    nan = np.full(n, np.nan)
    v = {k: np.concatenate([np.asarray(a, dtype=float), nan]) for k, a in values.items()}
    h = {k: HistogramInput(x.les, np.vstack([x.counts, np.full((n, len(x.les)), np.nan)]))
         for k, x in hists.items()}
    return v, h
