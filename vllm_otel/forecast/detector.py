"""PredictiveFailureDetector: per instance and signal forecasts, precursors and a learned state graph.

Each step (a scrape, a query_range point, or one ``analyze_checkpoint`` call):

1. inputs -> signals (:class:`~vllm_otel.forecast.signals.SignalExtractor`), vectorised over instances;
2. every forecast signal's model state is updated with fixed parameters
   (:class:`~vllm_otel.forecast.statespace.InnovationsBank`): microseconds per series;
3. each forecast becomes P(threshold crossed within the horizon) and a time to failure;
4. the precursor models (:mod:`~vllm_otel.forecast.precursors`: engine stall, load trend, offered
   load, preemption window, memory slope) and the health-state graph give learned probabilities;
   each failure publishes the highest estimate it has;
5. a bounded number of series are refit with statsmodels (:class:`~vllm_otel.forecast.refit.RefitScheduler`):
   never-fit ones first, then those whose errors show a regime change, then the stalest.

Fitting is the only expensive part, and it is capped per step, so a step's cost is linear in the
number of instances. Everything is deterministic given the inputs (no wall clock, no randomness)
unless ``refit_time_budget_s`` is set, which the long-running service may want.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.special import ndtr

from vllm_otel.forecast.detector_config import DetectorConfig
from vllm_otel.forecast.failures import FORECAST_SIGNAL, SCORE_SIGNAL
from vllm_otel.forecast.models import MODELS, get_model
from vllm_otel.forecast.precursors import first_time
from vllm_otel.forecast.precursors.load_trend import TREND_PRECURSORS, LoadTrend
from vllm_otel.forecast.precursors.memory import MemoryTrend
from vllm_otel.forecast.precursors.offered_load import OfferedLoad
from vllm_otel.forecast.precursors.preemption import PreemptionWindow
from vllm_otel.forecast.precursors.stall import EngineStall
from vllm_otel.forecast.refit import RefitScheduler
from vllm_otel.forecast.results import Checkpoint, Prediction, StepResult
from vllm_otel.forecast.signals import HistogramInput, SignalExtractor
from vllm_otel.forecast.statespace import InnovationsBank
from vllm_otel.forecast.stategraph import StateGraph, classify, state_names

__all__ = ["PredictiveFailureDetector"]


class PredictiveFailureDetector:
    """Failure probabilities and times to failure for many vLLM instances, step by step.

    The precursor models are classes a subclass may replace (``offered_load_model``), or leave
    out (``preemption_model = None``: the generic forecast of the windowed count instead), to
    compare alternatives (benchmarks/precursor_alternatives.py).
    """

    offered_load_model: type[OfferedLoad] = OfferedLoad
    preemption_model: type[PreemptionWindow] | None = PreemptionWindow

    def __init__(self, config: DetectorConfig | Mapping[str, Any] | None = None):
        self.config = cfg = DetectorConfig.model_validate(config or {})
        self.catalog = cfg.catalog
        self.failure_types = cfg.catalog.enabled()
        self.horizon_steps = max(1, int(math.ceil(cfg.horizon_s / cfg.step_s)))
        self.extractor = SignalExtractor(cfg.catalog, cfg.step_s)
        default = get_model(cfg.default_model, cfg.default_params).innovations()
        self._model_names = list(MODELS)
        self._default_name = f"{cfg.default_model}:default"  # before a series' first fit
        max_gap = max(1, int(cfg.max_gap_s / cfg.step_s))
        self.banks = {s: InnovationsBank(default, cfg.fit_window, sigma_halflife=cfg.sigma_halflife_steps,
                                         max_gap_steps=max_gap)
                      for s in dict.fromkeys(FORECAST_SIGNAL[f] for f in self.failure_types
                                             if f in FORECAST_SIGNAL)}
        self.refitter = RefitScheduler(cfg, self.banks, self._model_names)
        stall_steps = max(1, int(math.ceil(cfg.catalog.engine_stall.flat_s / cfg.step_s)))
        self.state_names = state_names(min(stall_steps, 30))
        self.graph = StateGraph(self.state_names, self.horizon_steps, cfg.graph_prior)
        self._graph_silent = np.array([n in cfg.graph_silent_states for n in self.state_names])
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self.cap = 0
        self._last_seen = np.zeros(0)
        self._n_steps = np.zeros(0, dtype=np.int64)
        self._prev_state = np.zeros(0, dtype=np.int64)
        self._t: float | None = None
        self.refits = 0
        self._units_cache: tuple[list[str], np.ndarray] | None = None
        # The precursor models, and what the last step's left for the prediction.
        self.stall = EngineStall(stall_steps, self.horizon_steps, cfg.step_s,
                                 max(3, int(round(cfg.trend_window_s / cfg.step_s))),
                                 cfg.stall_prior_strength, cfg.stall_base_prior_horizons)
        self.load_trend = LoadTrend(cfg, self.horizon_steps, self.stall)
        self.offered_load = self.offered_load_model(cfg, cfg.catalog)
        self.preemption = (self.preemption_model(cfg, cfg.catalog, self.horizon_steps)
                           if self.preemption_model is not None else None)
        self.memory = MemoryTrend(cfg.memory_slope_points, cfg.memory_slope_r2, self.horizon_steps, cfg.step_s)
        self._mem_prob: np.ndarray | None = None
        self._mem_ttf: np.ndarray | None = None
        self._trend: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._cap: tuple[np.ndarray, np.ndarray] | None = None
        hist_s = cfg.min_history_s if cfg.min_history_s is not None else cfg.horizon_s / 2
        self.warmup_steps = max(cfg.min_points, int(math.ceil(hist_s / cfg.step_s - 1e-9)))
        self._grow(16)

    # -- rows ------------------------------------------------------------------------------
    def _grow(self, cap: int) -> None:
        if cap <= self.cap:
            return
        self.stall.grow(cap)
        self.load_trend.grow(cap)
        self.offered_load.grow(cap)
        self.extractor.grow(cap)
        for b in self.banks.values():
            b.grow(cap)
        self.refitter.grow(cap)
        for name, fill, dt in (("_last_seen", -np.inf, float), ("_n_steps", 0, np.int64),
                               ("_prev_state", -1, np.int64)):
            new = np.full(cap, fill, dtype=dt)
            new[: self.cap] = getattr(self, name)
            setattr(self, name, new)
        self.cap = cap

    def _rows_for(self, units: Sequence[str]) -> np.ndarray:
        # A service or replay passes the same instance list step after step: reuse its rows.
        cached = self._units_cache
        if cached is not None and isinstance(units, list) and cached[0] == units:  # no copy to make
            return cached[1]
        key = [str(u) for u in units]
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = self._lookup(key)
        self._units_cache = (key, rows)
        return rows

    def _lookup(self, units: Sequence[str]) -> np.ndarray:
        rows = np.empty(len(units), dtype=np.int64)
        new: list[int] = []
        for i, u in enumerate(units):
            r = self._rows.get(u)
            if r is None:
                if not self._free:
                    old = self.cap
                    self._grow(max(16, 2 * self.cap))
                    self._free.extend(range(self.cap - 1, old - 1, -1))
                r = self._free.pop()
                self._rows[u] = r
                new.append(r)
            rows[i] = r
        if new:
            fresh = np.array(new, dtype=np.int64)
            for b in self.banks.values():
                b.reset(fresh, keep_params=False)  # start from the current (possibly pooled) defaults
        return rows

    def _release(self, rows: np.ndarray) -> None:
        self.extractor.clear(rows)
        for b in self.banks.values():
            b.reset(rows, keep_params=False)
        self.refitter.forget(rows)
        self._last_seen[rows] = -np.inf
        self._n_steps[rows] = 0
        self._prev_state[rows] = -1
        self.stall.release(rows)
        self.load_trend.release(rows)
        self.offered_load.reset(rows)

    def forget_stale(self, t: float) -> list[str]:
        """Drop instances not seen for ``forget_after_s`` (they disappeared); returns their names."""
        if not self._rows:
            return []
        rows = np.fromiter(self._rows.values(), dtype=np.int64, count=len(self._rows))
        if not (t - self._last_seen[rows] > self.config.forget_after_s).any():
            return []
        gone = [u for u, r in self._rows.items() if t - self._last_seen[r] > self.config.forget_after_s]
        self._units_cache = None
        if gone:
            rows = np.array([self._rows.pop(u) for u in gone], dtype=np.int64)
            self._release(rows)
            self._free.extend(int(r) for r in rows)
        return gone

    @property
    def instances(self) -> list[str]:
        return list(self._rows)

    # -- the step ---------------------------------------------------------------------------
    def step(self, t: float, units: Sequence[str], values: Mapping[str, np.ndarray],
             histograms: Mapping[str, HistogramInput] | None = None, *,
             predict: bool = True, refit: bool = True) -> StepResult | None:
        """Observe one time step for ``units`` (inputs as (n,) arrays) and predict.

        Instances absent from ``units`` simply have a gap. ``predict=False`` only updates state
        (warming up from history); ``refit=False`` skips the scheduled statsmodels fits.
        """
        cfg = self.config
        t = float(t)
        self.forget_stale(t)
        rows = self._rows_for(units)
        n = len(rows)
        sig = self.extractor.update(rows, t, values, histograms)
        restarted = sig["restarted"] > 0
        if restarted.any():
            # vLLM restarted: the series start over, so must the state (the fitted parameters
            # still describe the instance and are kept).
            for b in self.banks.values():
                b.reset(rows[restarted])
            self.refitter.forget(rows[restarted])  # refit once the new run has enough points
            self.offered_load.reset(rows[restarted])
        for s, b in self.banks.items():
            b.update(rows, self._transform(s, sig[s]))
        # Only steps with data count (a unit passed with NaN is in a gap, not alive).
        has = np.zeros(n, dtype=bool)
        for v in values.values():
            has |= np.isfinite(np.asarray(v, dtype=float))
        for h in (histograms or {}).values():
            has |= np.isfinite(h.counts).any(axis=1)
        self._last_seen[rows] = np.where(has, t, self._last_seen[rows])
        self._n_steps[rows] += has
        breached = self.catalog.breached(sig)
        self.stall.observe(rows, sig["flat_seconds"])
        self.load_trend.record(rows, breached)
        if cfg.use_capacity:
            self.offered_load.observe(rows, sig, moving=self.stall.flat_k[rows] == 0)
        precursors = self._precursors(rows, sig, trend=predict)
        states = classify(self.state_names, sig, breached, precursors, cfg.step_s)
        if cfg.use_state_graph:
            self.graph.observe(self._prev_state[rows], states)
        self._prev_state[rows] = states
        result = self._predict(t, units, rows, sig, breached, precursors, states) if predict else None
        if refit:
            self._refit(t)
        self._t = t
        return result

    def analyze_checkpoint(self, checkpoint: Checkpoint | Mapping[str, Any]) -> list[Prediction]:
        """The spec's entry point: observe one instance's checkpoint and return its predictions.

        Predictions are sorted by probability; failure types without enough data are left out.
        """
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = Checkpoint(**dict(checkpoint))
        values = {k: np.array([v], dtype=float) for k, v in checkpoint.values.items()}
        hists = {}
        for k, buckets in checkpoint.histograms.items():
            les = np.array(sorted(float(le) for le in buckets), dtype=float)
            counts = np.array([[float(buckets[le]) for le in sorted(buckets, key=float)]], dtype=float)
            hists[k] = HistogramInput(les, counts)
        res = self.step(checkpoint.timestamp, [checkpoint.instance], values, hists)
        return res.predictions() if res is not None else []

    # -- pieces of the step ------------------------------------------------------------------
    def _transform(self, signal: str, x: np.ndarray) -> np.ndarray:
        if signal in self.config.log_signals:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.log(np.maximum(x, 1e-4))  # NaN stays NaN; 0.1 ms floor for empty buckets
        return x

    def _precursors(self, rows: np.ndarray, sig: Mapping[str, np.ndarray],
                    trend: bool = True) -> dict[str, np.ndarray]:
        cfg, cat = self.config, self.catalog
        with np.errstate(invalid="ignore"):
            kv_high = sig["kv_usage"] >= cfg.kv_high_fraction * cat.kv_cache_exhaustion.threshold
            kv_slope = (self.banks["kv_usage"].slope[rows] if "kv_usage" in self.banks
                        else np.zeros(len(rows)))
            out = {
                "kv_high": kv_high,
                "kv_rising_with_preemptions": kv_high & (kv_slope > 0) & (sig["preemptions_window"] > 0),
                "tokens_flat_while_running": sig["flat_seconds"] >= cfg.step_s,
                "thermal_high": sig["gpu_temperature"] >= sig["gpu_temperature_limit"] - cfg.thermal_margin_c,
                "ecc_corrected": sig["ecc_corrected_window"] > 0,
            }
        out["memory_steady_slope"], self._mem_prob, self._mem_ttf = self.memory.probability(
            rows, self.banks.get("memory_fraction"), full=trend)
        self._trend = {}
        for s in (cfg.trend_signals if trend else ()):  # only what a prediction uses: not while ingesting
            if s in self.banks and s in TREND_PRECURSORS:
                f, name = TREND_PRECURSORS[s]
                if f in self.failure_types:
                    thr = self.catalog.threshold(f, sig)
                    active, prob, ttf = self.load_trend.probability(rows, s, self.banks[s], thr)
                    out[name] = active
                    self._trend[f] = (prob, ttf)
        for name in ("kv_usage_rising", "waiting_rising"):
            out.setdefault(name, np.zeros(len(rows), dtype=bool))
        self._cap = None
        if trend and cfg.use_capacity and "queue_overload" in self.failure_types:
            active, prob, ttf = self.offered_load.probability(rows, sig)
            out["arrivals_over_capacity"] = active
            self._cap = (prob, ttf)
        out.setdefault("arrivals_over_capacity", np.zeros(len(rows), dtype=bool))
        return out

    def _predict(self, t: float, units: Sequence[str], rows: np.ndarray, sig: dict[str, np.ndarray],
                 breached: dict[str, np.ndarray], precursors: dict[str, np.ndarray],
                 states: np.ndarray) -> StepResult:
        cfg = self.config
        n, fts, H = len(rows), self.failure_types, self.horizon_steps
        prob = np.full((n, len(fts)), np.nan)
        ttf = np.full((n, len(fts)), np.nan)
        source = np.zeros((n, len(fts)), dtype=np.int8)
        forecast_p = np.full((n, len(fts)), np.nan)
        enough = self._n_steps[rows] >= cfg.min_points      # the memory regression's own bar
        warm = self._n_steps[rows] >= self.warmup_steps     # forecasts and learned probabilities
        g_prob = g_steps = None
        if cfg.use_state_graph:
            g_prob, g_steps = self.graph.predict(states)
        models: dict[str, list[str | None]] = {}
        for j, f in enumerate(fts):
            s = FORECAST_SIGNAL.get(f)
            if s is not None and s in self.banks:
                bank = self.banks[s]
                thr = self._transform(s, self.catalog.threshold(f, sig))
                ok = (bank.nobs[rows] >= self.warmup_steps) & (bank.gap[rows] <= 1) & np.isfinite(thr) & warm
                if ok.any() and f == "preemption_storm" and self.preemption is not None:
                    # the window's own model instead of the generic forecast of the windowed count
                    wp, wt = self.preemption.probability(rows[ok], t, self.extractor)
                    prob[ok, j], ttf[ok, j] = wp, wt
                    source[ok, j] = np.where(np.isfinite(wp), 2, 0)
                    forecast_p[ok, j] = wp
                elif ok.any():
                    mean, std = bank.forecast(rows[ok], H)
                    # P(the path crosses within H) lies between max_h P(y_h >= thr) (paths driven by
                    # the same accumulated errors, i.e. fully correlated) and 1 - prod(1 - p_h)
                    # (independent steps, which turns 24 steps of p=0.05 into an alarm-level 0.7).
                    # Our forecast errors are cumulative sums of one innovation sequence, so
                    # adjacent steps are almost perfectly correlated: we take the max. It errs
                    # low only for diffuse random-walk forecasts, the ones that should not alarm.
                    with np.errstate(divide="ignore", invalid="ignore"):
                        z = (mean - thr[ok, None]) / np.maximum(std, 1e-12)
                    p_h = ndtr(z)
                    prob[ok, j] = p_h.max(axis=1)
                    ttf[ok, j] = first_time(p_h >= 0.5, cfg.step_s)
                    source[ok, j] = 2
                    forecast_p[ok, j] = prob[ok, j]
                codes = bank.model[rows]
                models[s] = [self._model_names[c] if c >= 0 else self._default_name for c in codes]
            if g_prob is not None and f in self.graph.failures and f != "engine_stall":
                gi = self.graph.failures.index(f)
                # Only where the failure is defined now: a queue limit not learned yet means
                # no prediction, not a guess.
                score_known = (np.isfinite(sig[SCORE_SIGNAL[f]]) & np.isfinite(self.catalog.threshold(f, sig))
                               & warm)
                gp = np.where(score_known, g_prob[:, gi], np.nan)
                # A learned probability beats a lower (or missing) model probability: each is a
                # calibrated estimate of the same event, and precursors are what the graph adds.
                # From a silent state (idle, serving) it is only the fleet's base rate: after one
                # instance's failures it would put every serving instance in alarm, so there it
                # only stands in where there is no other estimate.
                silent = self._graph_silent[np.maximum(states, 0)]
                better = np.isfinite(gp) & ~(prob[:, j] >= gp) & (~silent | np.isnan(prob[:, j]))
                prob[:, j] = np.where(better, gp, prob[:, j])
                ttf[:, j] = np.where(better, g_steps[:, gi] * cfg.step_s, ttf[:, j])
                source[:, j] = np.where(better, 3, source[:, j])
            if f == "engine_stall":
                # A direct rule: the flat spell's learned chance of reaching the definition.
                sp, ss = self.stall.probability(self.stall.flat_k[rows])
                known = np.isfinite(sig["flat_seconds"]) & warm
                flat = known & (self.stall.flat_k[rows] > 0)
                prob[:, j] = np.where(known, sp, np.nan)
                ttf[:, j] = np.where(known, ss * cfg.step_s, np.nan)
                source[:, j] = np.where(flat, 4, np.where(known, 3, 0))
            if f in self._trend:
                tp, tt = self._trend[f]
                tp = np.where(warm, tp, np.nan)
                better = np.isfinite(tp) & ~(prob[:, j] >= tp)
                prob[:, j] = np.where(better, tp, prob[:, j])
                ttf[:, j] = np.where(better, tt, ttf[:, j])
                source[:, j] = np.where(better, 4, source[:, j])
            if f == "queue_overload" and self._cap is not None:
                cp, ct = self._cap
                cp = np.where(warm, cp, np.nan)
                better = np.isfinite(cp) & ~(prob[:, j] >= cp)
                prob[:, j] = np.where(better, cp, prob[:, j])
                ttf[:, j] = np.where(better, ct, ttf[:, j])
                source[:, j] = np.where(better, 4, source[:, j])
            if f == "memory_exhaustion" and self._mem_prob is not None:
                mp = np.where(enough, self._mem_prob, np.nan)
                better = np.isfinite(mp) & ~(prob[:, j] >= mp)
                prob[:, j] = np.where(better, mp, prob[:, j])
                ttf[:, j] = np.where(better, self._mem_ttf, ttf[:, j])
                source[:, j] = np.where(better, 4, source[:, j])
            hit = breached[f]
            prob[hit, j], ttf[hit, j], source[hit, j] = 1.0, 0.0, 1
        return StepResult(t=t, units=list(units), failure_types=fts, probability=prob,
                          time_to_failure=ttf, source=source,
                          breached=np.stack([breached[f] for f in fts], axis=1),
                          signals=sig, states=states, precursors=precursors, models=models,
                          actions={f: self.catalog.actions(f) for f in fts}, forecast_probability=forecast_p)

    # -- scheduled refits -------------------------------------------------------------------
    def _refit(self, t: float) -> int:
        """Refit the most deserving series with statsmodels, within this step's budget."""
        if not self._rows:
            return 0
        done = self.refitter.run(t, np.fromiter(self._rows.values(), dtype=np.int64))
        self.refits += done
        return done
