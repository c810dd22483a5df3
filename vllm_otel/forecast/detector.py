"""PredictiveFailureDetector: per instance and signal forecasts, precursors and a learned state graph.

Each step (a scrape, a query_range point, or one ``analyze_checkpoint`` call):

1. inputs -> signals (:class:`~vllm_otel.forecast.signals.SignalExtractor`), vectorised over instances;
2. every forecast signal's model state is updated with fixed parameters
   (:class:`~vllm_otel.forecast.statespace.InnovationsBank`): microseconds per series;
3. each forecast becomes P(threshold crossed within the horizon) and a time to failure;
4. precursor patterns and the health-state graph give a second, learned probability per failure;
5. a bounded number of series are refit with statsmodels (:func:`~vllm_otel.forecast.models.select_model`):
   never-fit ones first, then those whose errors show a regime change, then the stalest.

Fitting is the only expensive part, and it is capped per step, so a step's cost is linear in the
number of instances. Everything is deterministic given the inputs (no wall clock, no randomness)
unless ``refit_time_budget_s`` is set, which the long-running service may want.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import betainc, ndtr

from vllm_otel.forecast.failures import FAILURE_TYPES, FORECAST_SIGNAL, SCORE_SIGNAL, FailureCatalog
from vllm_otel.forecast.models import MODELS, get_model, select_model
from vllm_otel.forecast.signals import HistogramInput, InputSeries, SignalExtractor, collect_samples
from vllm_otel.forecast.statespace import Innovations, InnovationsBank, filter_series
from vllm_otel.forecast.stategraph import BASE_STATES, GraphPrior, StateGraph, classify, state_names

__all__ = ["PredictiveFailureDetector", "DetectorConfig", "Prediction", "Checkpoint", "StepResult",
           "PRECURSORS", "SOURCES", "TREND_PRECURSORS"]

# Gauss-Hermite nodes and weights (probabilists'), for integrating over a standard normal.
_GH = (lambda zw: (zw[0], zw[1] / zw[1].sum()))(np.polynomial.hermite_e.hermegauss(9))
# Bins of the learned residual tail (standardised residuals; beyond the last edge: the prior's).
_TAIL_EDGES = np.arange(-8.0, 12.0 + 1e-9, 0.25)

# Which model families suit which signal: bounded load signals mean-revert (damped), memory
# climbs steadily (Holt), bursty queues and latencies may have autocorrelated changes (ARIMA).
DEFAULT_CANDIDATES: dict[str, list[str]] = {
    "kv_usage": ["damped_holt", "holt", "ses", "arima"],
    "preemptions_window": ["damped_holt", "ses"],
    "waiting": ["damped_holt", "ses", "arima"],
    "ttft_quantile": ["damped_holt", "ses", "arima"],
    "memory_fraction": ["holt", "damped_holt", "ses"],
    "gpu_temperature": ["damped_holt", "ses", "arima"],
}

# precursor pattern -> the failures it points to
PRECURSORS: dict[str, tuple[str, ...]] = {
    "kv_rising_with_preemptions": ("kv_cache_exhaustion", "preemption_storm"),
    "memory_steady_slope": ("memory_exhaustion",),
    "tokens_flat_while_running": ("engine_stall",),
    "kv_usage_rising": ("kv_cache_exhaustion",),
    "waiting_rising": ("queue_overload",),
    "arrivals_over_capacity": ("queue_overload",),
}
# load signal -> (its failure, the precursor its recent trend raises); see ``_load_trend``
TREND_PRECURSORS: dict[str, tuple[str, str]] = {
    "kv_usage": ("kv_cache_exhaustion", "kv_usage_rising"),
    "waiting": ("queue_overload", "waiting_rising"),
}
SOURCES = ("none", "breach", "forecast", "state_graph", "precursor")


def _first_time(reached: np.ndarray, dt: float) -> np.ndarray:
    """(n, H) bool, True from where the failure is more likely than not -> the time of the first
    True column ((column + 1) x ``dt``), NaN in rows without one."""
    return np.where(reached.any(axis=1), (np.argmax(reached, axis=1) + 1) * dt, np.nan)


class DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step_s: float = Field(5.0, gt=0.0, description="nominal time between observations")
    horizon_s: float = Field(120.0, gt=0.0)
    min_points: int = Field(12, ge=2, description="observations of a signal before it is forecast")
    min_history_s: float | None = Field(
        None, ge=0.0, description="seconds of data (observations x step) an instance needs before "
                                  "any forecast or learned probability; None: half the horizon. "
                                  "At a 1 s scrape, 12 points are far too few to extrapolate 120 s")
    fit_window: int = Field(360, ge=20, description="points kept per series, and fit on")
    min_fit_points: int = Field(30, ge=10)
    refit_every_s: float = Field(900.0, gt=0.0)
    min_refit_interval_s: float = Field(60.0, ge=0.0, description="between regime-change refits")
    regime_fit_points: int = Field(60, ge=10, description="a refit after a regime change uses only "
                                                          "this many recent points: older ones describe "
                                                          "the regime that ended")
    max_refits_per_step: int = Field(8, ge=0)
    pool_min_fits: int = Field(5, ge=1, description="fitted series of a signal before unfit ones "
                                                    "borrow their median parameters")
    refit_time_budget_s: float | None = Field(None, gt=0.0, description="wall-clock cap per step")
    regime_surprise: float = Field(2.0, gt=0.0, description="error surprise (see InnovationsBank."
                                                            "surprise; about 1 when the model fits) that triggers a refit")
    max_gap_s: float = Field(60.0, gt=0.0, description="a longer gap restarts a series' state")
    forget_after_s: float = Field(600.0, gt=0.0, description="drop an instance unseen this long")
    sigma_halflife_steps: float = Field(60.0, gt=0.0)
    # Conservative parameters until a series has been fit: a slow slope keeps noise from
    # looking like a trend.
    default_model: str = "damped_holt"
    default_params: dict[str, float] = Field(default_factory=lambda: {"alpha": 0.3, "beta": 0.02,
                                                                       "phi": 0.95})
    candidates: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_CANDIDATES.items()})
    # Latencies grow multiplicatively and come from coarse buckets: modelled in log space, where
    # growth is a trend and a bucket jump is a bounded step. Crossing probabilities are unchanged
    # by a monotone transform, so thresholds are simply transformed too.
    log_signals: list[str] = Field(default_factory=lambda: ["ttft_quantile"])
    use_state_graph: bool = True
    graph_prior: GraphPrior = Field(default_factory=GraphPrior)
    # States that say nothing about where this instance is heading now, from which the graph's
    # probability is published where nothing else predicts the failure (gpu_hardware, a series
    # not fit yet) but never raises a model's probability. From "it is up" states it is the
    # fleet's base rate. Failures defined over a window (a TTFT-SLO breach, a preemption storm:
    # 60 s) stay failure states for the whole window after their cause has gone, so after an
    # overload they mark the recovery as much as the next overload; on the recorded queue_ramp a
    # TTFT breach lingering after a swell held P(queue_overload) at 0.74 with no request waiting.
    graph_silent_states: list[str] = Field(default_factory=lambda: [
        "no_data", "idle", "serving", "ttft_slo_breach", "preemption_storm"])
    kv_high_fraction: float = Field(0.9, gt=0.0, le=1.0, description="of the KV threshold: precursor")
    thermal_margin_c: float = Field(5.0, ge=0.0)
    memory_slope_points: int = Field(60, ge=5)
    memory_slope_r2: float = Field(0.9, gt=0.0, le=1.0)
    # Trend precursors on load signals (KV usage, waiting requests): a straight line through
    # block means of the recent window, extrapolated with its prediction interval, plus the
    # signal's own scrape-to-scrape noise around the line (a noisy signal touches the threshold
    # before its mean does).
    trend_window_s: float = Field(60.0, gt=0.0, description="recent data the load trend is fit on")
    trend_block_s: float = Field(5.0, gt=0.0, description="averaged into blocks this long first")
    trend_signals: list[str] = Field(default_factory=lambda: list(TREND_PRECURSORS))
    # A rise that ended in its failure is over: the trend is fit only on data since the signal's
    # failure last ended (as after a frozen engine). Fit through the failure, the line kept
    # P >= 0.89 for 17 s after an exhaustion on the recorded kv_ramp, the cache mostly below 0.3.
    trend_after_failure_only: bool = True
    # A frozen engine starts a new regime: the trend is fit only on data since tokens last flowed
    # after a flat spell at least this long. Shorter spells (a missed or repeated scrape: at a 1 s
    # scrape under load, tokens read flat for one step now and then) only drop their own samples.
    # Cutting at every flat step, one repeated sample 57 s before a KV exhaustion on a recorded
    # kv_ramp_large blanked the trend for the next 30 s, which were the warning.
    trend_freeze_s: float = Field(5.0, ge=0.0, description="a flat spell this long cuts the trend's history")
    # How far the noise around the trend line reaches: "learned" from the standardised residuals
    # this detector has seen (per signal, fleet-wide, starting from a Gaussian worth
    # trend_tail_prior observations), or "gaussian". Load signals are heavy-tailed (KV usage jumps
    # when a few long requests land together: on the recorded scenarios 4-5 % of samples sit more
    # than 3 sd above the window's mean, 30x the Gaussian share), so a Gaussian tail says "safe"
    # until the mean itself is nearly at the threshold.
    trend_tail: str = Field("learned", pattern="^(learned|gaussian)$")
    trend_tail_prior: float = Field(200.0, gt=0.0)
    # Engine stalls: a flat spell of k steps (tokens flat, requests present) reaches the stall
    # definition with a probability learned from the spells seen so far (fleet-wide), starting
    # from a prior mean of k / (steps that make a stall) with this many pseudo-spells.
    stall_prior_strength: float = Field(2.0, gt=0.0)
    # With no flat spell under way, P(engine_stall) is the fleet's rate of stall onsets per
    # flowing instance-step, over the horizon. Counted from the first minutes alone, one stall
    # makes it a coin flip for every instance (on the recorded stall scenario: 0.58-0.60 for the
    # rest of the run, where 0.05 of those steps saw a stall), and two would alarm them all. So
    # the rate starts from this many horizons of stall-free exposure; over a fleet's hours of
    # data it weighs nothing.
    stall_base_prior_horizons: float = Field(10.0, ge=0.0)
    # Queue overload from offered load against capacity (a leading signal, see ``_capacity``):
    # arrivals = finished + growth of running + waiting over a short window; service time per
    # running request = mean running / finish rate (Little's law), learned from the instance's
    # own history; capacity = running-request limit / service time. On by default since the
    # eight recordings of 2026-11-29: it warned of queue_ramp's first overflow (a first passage
    # from a saturated queue, which no trend of ``waiting`` saw) with no false alarm on any of
    # them. Earlier recordings had shown two false alarms on kv_ramp (benchmarks/README.md).
    use_capacity: bool = True
    # Arrivals are Poisson-like counts: over W seconds at a rate lam the measured rate is off by
    # sqrt(lam / W), while a rise at slope s is seen s W / 2 late. An overload within the horizon
    # needs arrivals only ~threshold / horizon above capacity (32 / 120 s = 0.27 req/s on the
    # recorded queue_ramp), so at 10 s (noise 0.67 req/s at 4.5 req/s) the warning drowned in
    # noise until the overflow; 20 s halves the variance for 5 s more lag. On the twelve
    # recordings of 2026-11-29 (benchmarks/README.md): queue lead 14 -> 38 s, precision 1.00 ->
    # 0.95; 30 s went on to 42 s but at 0.71, its lag now counting queues that KV fills build.
    arrival_window_s: float = Field(20.0, gt=0.0, description="arrivals are counted over this window")
    capacity_halflife_s: float = Field(120.0, gt=0.0, description="memory of the learned service time")
    capacity_min_finished: float = Field(10.0, gt=0.0, description="finished requests (decayed) "
                                                                   "before the service time is trusted")
    arrival_persist_s: float = Field(30.0, gt=0.0, description="the rate over this much of the future "
                                                               "is predicted from the measured arrival "
                                                               "rate by a regression learned per instance")
    arrival_model: str = Field("regression", pattern="^(regression|measured)$",
                               description="regression: the learned prediction of the coming rate; "
                                           "measured: the measured rate held for the horizon with "
                                           "Poisson error (short bursts are taken to last: false "
                                           "alarms at a steady 0.8 x load, kept for comparison)")
    # A preemption storm is a count over a sliding window, so the count ahead is what of the
    # window's past stays in it plus new preemptions, in bursts at the recent rate (half-life
    # below; see ``_preemption_window``). "forecast": the generic model of the windowed count,
    # which trends a window that must empty as its preemptions age out (kept for comparison: on
    # the ten recordings of 2026-11-29 it warned of none of five storms, and steps it put at
    # P 0.3-0.5 saw a storm follow 4-9 % of the time).
    preemption_model: str = Field("window_rate", pattern="^(window_rate|forecast)$")
    preemption_rate_halflife_s: float = Field(10.0, gt=0.0)
    catalog: FailureCatalog = Field(default_factory=FailureCatalog)
    inputs: InputSeries = Field(default_factory=InputSeries)

    @model_validator(mode="after")
    def _models_exist(self) -> "DetectorConfig":
        # Unknown model names or bad default parameters fail when the config is loaded, not mid-run.
        get_model(self.default_model, self.default_params)
        for names in self.candidates.values():
            for name in names:
                if name not in MODELS:
                    raise ValueError(f"unknown model {name!r} in candidates; registered: {sorted(MODELS)}")
        known = BASE_STATES + FAILURE_TYPES
        unknown = set(self.graph_silent_states) - set(known)
        if unknown:
            raise ValueError(f"graph_silent_states: unknown states {sorted(unknown)}; "
                             f"known: {list(known)}")
        return self


@dataclass(frozen=True)
class Prediction:
    """One failure forecast for one instance."""

    instance: str
    failure_type: str
    probability: float
    time_to_failure: float | None          # seconds; 0 when already failing; None: not within horizon
    recommended_actions: tuple[str, ...]
    timestamp: float
    source: str                            # breach | forecast | state_graph | precursor
    model: str | None = None               # the forecasting model behind a forecast
    precursors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"instance": self.instance, "failure_type": self.failure_type,
                "probability": self.probability, "time_to_failure_seconds": self.time_to_failure,
                "recommended_actions": list(self.recommended_actions), "t": self.timestamp,
                "source": self.source, "model": self.model, "precursors": list(self.precursors)}


@dataclass
class Checkpoint:
    """What one instance looked like at one time: input values and histogram buckets.

    ``values`` are keyed by input name (``kv_usage``, ``running``, ``preemptions``...: see
    :data:`~vllm_otel.forecast.signals.INPUT_KINDS`); ``histograms`` map an input to
    ``{le: cumulative count}``. :meth:`from_samples` builds one from raw Prometheus samples.
    """

    instance: str
    timestamp: float
    values: Mapping[str, float] = field(default_factory=dict)
    histograms: Mapping[str, Mapping[float, float]] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, instance: str, timestamp: float,
                     samples: Iterable[tuple[str, Mapping[str, str], float]],
                     inputs: InputSeries | None = None) -> "Checkpoint":
        values, hists = collect_samples(samples, inputs or InputSeries())
        return cls(instance, timestamp, values, hists)


@dataclass
class StepResult:
    """Everything one step produced, as arrays over its instances (rows) and failure types (cols)."""

    t: float
    units: list[str]
    failure_types: tuple[str, ...]
    probability: np.ndarray      # (n, F); NaN: no prediction (too little data)
    time_to_failure: np.ndarray  # (n, F) seconds; NaN: not within the horizon / no prediction
    source: np.ndarray           # (n, F) index into SOURCES
    breached: np.ndarray         # (n, F) bool
    signals: dict[str, np.ndarray]
    states: np.ndarray           # (n,) index into the detector's state names
    precursors: dict[str, np.ndarray]
    models: dict[str, list[str | None]]
    actions: dict[str, tuple[str, ...]]
    forecast_probability: np.ndarray  # (n, F) the statistical forecast alone; NaN: none (no model/data)

    def predictions(self, min_probability: float = 0.0) -> list[Prediction]:
        out: list[Prediction] = []
        for i, unit in enumerate(self.units):
            for j, f in enumerate(self.failure_types):
                p = self.probability[i, j]
                if not np.isfinite(p) or p < min_probability:
                    continue
                ttf = self.time_to_failure[i, j]
                sig = FORECAST_SIGNAL.get(f)
                pre = tuple(k for k, fs in PRECURSORS.items() if f in fs and self.precursors[k][i])
                out.append(Prediction(
                    instance=unit, failure_type=f, probability=float(p),
                    time_to_failure=float(ttf) if np.isfinite(ttf) else None,
                    recommended_actions=self.actions[f], timestamp=self.t,
                    source=SOURCES[int(self.source[i, j])],
                    model=self.models[sig][i] if sig in self.models and self.source[i, j] == 2 else None,
                    precursors=pre))
        out.sort(key=lambda p: -p.probability)
        return out


class PredictiveFailureDetector:
    """Failure probabilities and times to failure for many vLLM instances, step by step."""

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
        self._fit_n = {s: np.zeros(0, dtype=np.int64) for s in self.banks}
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
        self._mem_prob: np.ndarray | None = None
        self._mem_ttf: np.ndarray | None = None
        self._trend: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # Per trend signal: counts of standardised residuals (newest sample minus the trend line,
        # over the window's noise) in the bins of _TAIL_EDGES, for the learned tail.
        self._tail_counts = {sig: np.zeros(len(_TAIL_EDGES) - 1) for sig in TREND_PRECURSORS}
        self._tail_sf: dict[str, np.ndarray] = {}
        self.stall_steps = stall_steps
        self._flat_k = np.zeros(0, dtype=np.int64)
        self._flat_broken = np.zeros(stall_steps + 1)   # flat spells that ended after k steps
        self._flat_stalls = 0.0                         # spells that reached the stall definition
        self._flowing_steps = 0.0                       # instance-steps with tokens not flat
        # How long the flat spell had lasted at each recent step, in steps (0: tokens flowing; a
        # frozen engine freezes its gauges: those samples say nothing about load, and the trend
        # fit leaves them out). A ring per row, pushed once per step like the banks' histories,
        # so the two line up.
        self._trend_len = max(3, int(round(cfg.trend_window_s / cfg.step_s)))
        self._freeze_steps = max(1, int(math.ceil(cfg.trend_freeze_s / cfg.step_s - 1e-9)))
        self._flat_ring = np.zeros((0, self._trend_len), dtype=np.int64)
        self._ring_pos = np.zeros(0, dtype=np.int64)
        # The same, per trend signal: which recent steps had its failure under way.
        self._failed = {sig: np.zeros((0, self._trend_len), dtype=bool) for sig in TREND_PRECURSORS}
        # Offered load against capacity: a ring of cumulative arrivals (finished so far + running +
        # waiting; NaN where unknown or frozen), decayed sums for the service time and for the
        # regression of the coming arrival rate on the measured one.
        self._arr_w = max(2, int(round(cfg.arrival_window_s / cfg.step_s)))       # steps
        self._arr_p = max(1, int(round(cfg.arrival_persist_s / cfg.step_s)))      # steps
        self._arr_len = self._arr_w + self._arr_p + 1
        self._arr_cum = np.full((0, self._arr_len), np.nan)  # finished so far + running + waiting
        self._arr_pos = np.zeros(0, dtype=np.int64)
        self._occ_now = np.zeros(0)
        self._fin_cum = np.zeros(0)
        self._cap_run = np.zeros(0)     # decayed sum of running x step (request-seconds in service)
        self._cap_fin = np.zeros(0)     # decayed count of finished requests
        # decayed regression sums: x = arrival rate measured then, y = the rate over the
        # arrival_persist_s that followed; columns n, x, y, xx, xy, yy
        self._reg = np.zeros((0, 6))
        self._cap_decay = 0.5 ** (cfg.step_s / cfg.capacity_halflife_s)
        self._cap: tuple[np.ndarray, np.ndarray] | None = None
        hist_s = cfg.min_history_s if cfg.min_history_s is not None else cfg.horizon_s / 2
        self.warmup_steps = max(cfg.min_points, int(math.ceil(hist_s / cfg.step_s - 1e-9)))
        self._grow(16)

    # -- rows ------------------------------------------------------------------------------
    def _grow(self, cap: int) -> None:
        if cap <= self.cap:
            return
        flat = np.zeros((cap, self._trend_len), dtype=np.int64)
        flat[: self.cap] = self._flat_ring
        self._flat_ring = flat
        for sig, ring in self._failed.items():
            grown = np.zeros((cap, self._trend_len), dtype=bool)
            grown[: self.cap] = ring
            self._failed[sig] = grown
        pos = np.zeros(cap, dtype=np.int64)
        pos[: self.cap] = self._ring_pos
        self._ring_pos = pos
        new = np.full((cap, self._arr_len), np.nan)
        new[: self.cap] = self._arr_cum
        self._arr_cum = new
        reg = np.zeros((cap, 6))
        reg[: self.cap] = self._reg
        self._reg = reg
        for name in ("_arr_pos", "_occ_now", "_fin_cum", "_cap_run", "_cap_fin"):
            old_a = getattr(self, name)
            new = np.zeros(cap, dtype=old_a.dtype)
            new[: self.cap] = old_a
            setattr(self, name, new)
        self.extractor.grow(cap)
        for s, b in self.banks.items():
            b.grow(cap)
            fit_n = np.zeros(cap, dtype=np.int64)
            fit_n[: self.cap] = self._fit_n[s]
            self._fit_n[s] = fit_n
        for name, fill, dt in (("_last_seen", -np.inf, float), ("_n_steps", 0, np.int64),
                               ("_prev_state", -1, np.int64), ("_flat_k", 0, np.int64)):
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
        for s, b in self.banks.items():
            b.reset(rows, keep_params=False)
            self._fit_n[s][rows] = 0
        self._last_seen[rows] = -np.inf
        self._n_steps[rows] = 0
        self._prev_state[rows] = -1
        self._flat_k[rows] = 0
        self._flat_ring[rows] = 0
        for ring in self._failed.values():
            ring[rows] = False
        self._reset_capacity(rows)

    def _reset_capacity(self, rows: np.ndarray) -> None:
        self._arr_cum[rows] = np.nan
        for a in (self._arr_pos, self._occ_now, self._fin_cum, self._cap_run, self._cap_fin, self._reg):
            a[rows] = 0

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
            for s, b in self.banks.items():
                b.reset(rows[restarted])
                self._fit_n[s][rows[restarted]] = 0  # refit once the new run has enough points
            self._reset_capacity(rows[restarted])
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
        self._observe_flat(rows, sig["flat_seconds"])
        last = (self._ring_pos[rows] - 1) % self._trend_len  # the ring slot _observe_flat just filled
        for s, ring in self._failed.items():
            f = TREND_PRECURSORS[s][0]
            ring[rows, last] = breached[f] if f in breached else False
        self._observe_load(rows, sig)
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
        out["memory_steady_slope"], self._mem_prob, self._mem_ttf = self._memory_trend(rows, full=trend)
        self._trend = {}
        for s in (cfg.trend_signals if trend else ()):  # only what a prediction uses: not while ingesting
            if s in self.banks and s in TREND_PRECURSORS:
                f, name = TREND_PRECURSORS[s]
                if f in self.failure_types:
                    thr = self.catalog.threshold(f, sig)
                    active, prob, ttf = self._load_trend(rows, s, thr)
                    out[name] = active
                    self._trend[f] = (prob, ttf)
        for name in ("kv_usage_rising", "waiting_rising"):
            out.setdefault(name, np.zeros(len(rows), dtype=bool))
        self._cap = None
        if trend and cfg.use_capacity and "queue_overload" in self.failure_types:
            active, prob, ttf = self._capacity(rows, sig)
            out["arrivals_over_capacity"] = active
            self._cap = (prob, ttf)
        out.setdefault("arrivals_over_capacity", np.zeros(len(rows), dtype=bool))
        return out

    # -- engine stalls: a direct rule on flat spells, its probabilities learned ---------------
    def _observe_flat(self, rows: np.ndarray, flat_seconds: np.ndarray) -> None:
        """Follow each instance's flat spell (steps with tokens flat while requests are present)
        and count, fleet-wide, how long spells last: the survival the stall probability uses."""
        K, step = self.stall_steps, self.config.step_s
        known = np.isfinite(flat_seconds)
        k_now = np.where(known, np.floor(np.nan_to_num(flat_seconds) / step + 1e-6), 0).astype(np.int64)
        prev = self._flat_k[rows]
        k_now = np.where(known, k_now, prev)  # unknown data: the spell neither grows nor ends
        broke = known & (prev > 0) & (prev < K) & (k_now < prev)
        if broke.any():
            np.add.at(self._flat_broken, prev[broke], 1.0)
        self._flat_stalls += float(((prev < K) & (k_now >= K)).sum())
        self._flowing_steps += float((known & (k_now == 0)).sum())
        self._flat_k[rows] = k_now
        pos = self._ring_pos[rows]
        self._flat_ring[rows, pos] = k_now
        self._ring_pos[rows] = (pos + 1) % self._trend_len

    def stall_probability(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(a spell flat for ``k`` steps reaches the stall definition) and steps left.

        Beta-binomial on the spells seen: of those that lasted at least k steps, how many went
        on to a stall; prior mean k/K with ``stall_prior_strength`` pseudo-spells. Not flat
        (k = 0): the learned rate of stall onsets per flowing instance-step (starting from
        ``stall_base_prior_horizons`` horizons without a stall), over the horizon.
        """
        K, H = self.stall_steps, self.horizon_steps
        reached_by_len = np.concatenate([np.cumsum(self._flat_broken[::-1])[::-1], [0.0]])  # sum_{L>=k}
        kk = np.clip(k, 0, K)
        reached = self._flat_stalls + reached_by_len[np.minimum(kk, K)]
        s = self.config.stall_prior_strength
        flat_p = (self._flat_stalls + s * kk / K) / (reached + s)
        rate = self._flat_stalls / (self._flowing_steps + 1.0 + self.config.stall_base_prior_horizons * H)
        base = 1.0 - (1.0 - rate) ** H
        prob = np.where(kk >= K, 1.0, np.where(kk > 0, flat_p, base))
        steps = np.where(kk > 0, np.maximum(K - kk, 0).astype(float), np.nan)
        return prob, steps

    def _load_trend(self, rows: np.ndarray, signal: str, thr: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(threshold reached within the horizon) from the recent trend of a noisy load signal.

        The last ``trend_window_s`` of observations are averaged into blocks of ``trend_block_s``
        (scrape noise and short bursts averaged out), a least-squares line is fit through the
        block means, and the future blocks' means come from the line with its prediction
        interval (one common error for the whole path, integrated by Gauss-Hermite quadrature).
        Given the line, each future block touches the threshold with the probability that the
        signal's own noise around the line carries it there, independently per block. Returns
        (rising, probability, time to failure), NaN where too little data.
        """
        cfg, bank = self.config, self.banks[signal]
        n = len(rows)
        B = max(1, int(round(cfg.trend_block_s / cfg.step_s)))
        nb = max(3, int(round(cfg.trend_window_s / cfg.step_s)) // B)
        N = nb * B
        Hb = max(1, int(math.ceil(self.horizon_steps / B)))
        back = np.arange(N)[::-1]                        # oldest first
        y = bank.last_points(rows, back)
        fidx = (self._ring_pos[rows, None] - 1 - back[None, :]) % self._trend_len
        flat_k = self._flat_ring[rows[:, None], fidx]
        frozen = flat_k >= self._freeze_steps     # cuts the history before it
        if cfg.trend_after_failure_only:
            # Once the failure is over (a block, and at least two scrapes, without it): a signal
            # bouncing around its threshold is still failing, and its rise still describes it.
            failed = self._failed[signal][rows[:, None], fidx]
            over = ~failed[:, -max(B, 2):].any(axis=1)
            frozen = frozen | (failed & over[:, None])
        # Only data since the engine last moved: a frozen spell and what came before it are a
        # different regime (the backlog that floods in after a freeze is no trend either), and
        # so are a failure of this signal and the rise that led to it.
        frozen = np.maximum.accumulate(frozen[:, ::-1], axis=1)[:, ::-1] | (flat_k > 0)
        y = np.where((back[None, :] < bank.hlen[rows][:, None]) & ~frozen, y, np.nan).reshape(n, nb, B)
        cnt = np.isfinite(y).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            # a block needs half its points; the line needs half the window (too little data:
            # no trend rather than one drawn through two noisy points)
            means = np.where(2 * cnt >= B, np.nansum(y, axis=2) / np.maximum(cnt, 1), np.nan)
            use = np.isfinite(means)
            x = np.arange(nb, dtype=float) - (nb - 1)         # block index relative to now
            m = use.sum(axis=1).astype(float)
            xm = np.where(use, x, 0).sum(axis=1) / m
            ym = np.where(use, means, 0).sum(axis=1) / m
            dx = np.where(use, x[None, :] - xm[:, None], 0.0)
            dy = np.where(use, means - ym[:, None], 0.0)
            sxx = (dx * dx).sum(axis=1)
            slope = (dx * dy).sum(axis=1) / sxx
            fit = ym[:, None] + slope[:, None] * (x[None, :] - xm[:, None])
            s2 = np.where(use, (means - fit) ** 2, 0).sum(axis=1) / np.maximum(m - 2, 1)
            raw = np.where(np.isfinite(y), y - fit[:, :, None], 0.0).reshape(n, -1)
            noise = np.sqrt((raw * raw).sum(axis=1) / np.maximum(cnt.sum(axis=1), 1))
            # Damped: a rise seen for the window is expected to go on for about as long again
            # (phi = 1 - block/window), not forever; load signals are bounded and rises end.
            phi = 1.0 - 1.0 / nb
            hb = np.cumsum(phi ** np.arange(1, Hb + 1, dtype=float))
            mean = ym[:, None] + slope[:, None] * (hb[None, :] - xm[:, None])
            se = np.sqrt(s2[:, None] * (1.0 / m[:, None] + (hb[None, :] - xm[:, None]) ** 2 / sxx[:, None]))
            z, w = _GH
            level = mean[:, None, :] + z[None, :, None] * se[:, None, :]          # (n, Q, Hb)
            sd = np.maximum(noise, 1e-9)[:, None, None]
            p_blk = self._tail(signal, (thr[:, None, None] - level) / sd)
            if cfg.trend_tail == "learned":
                # Learn from the newest sample's residual where the fit is sound (causal: it
                # shapes the next step's tail, not this one's).
                zr = raw[:, -1] / np.maximum(noise, 1e-9)
                good = (m >= max(3, nb // 2)) & (sxx > 0) & (noise > 1e-6) & np.isfinite(zr) \
                    & np.isfinite(y[:, -1, -1]) & (bank.gap[rows] <= 1)
                if good.any():
                    counts, _ = np.histogram(np.clip(zr[good], _TAIL_EDGES[0], _TAIL_EDGES[-1] - 1e-9),
                                             bins=_TAIL_EDGES)
                    self._tail_counts[signal] += counts
                    self._tail_sf.pop(signal, None)
            log_none = np.cumsum(np.log1p(-np.minimum(p_blk, 1 - 1e-12)), axis=2)
            p_by = ((1.0 - np.exp(log_none)) * w[None, :, None]).sum(axis=1)    # P(reached by block b)
            prob = p_by[:, -1]
            # Time to failure: the median time of the first crossing (P(reached by then) = 1/2), so
            # it agrees with the probability. The line's mean alone crosses later, if at all: the
            # noise reaches the threshold first. On the recorded scenarios the mean's crossing put
            # the failure 48 s (median) later than it came, and too late in 90 % of alarming steps.
            ttf = _first_time(p_by >= 0.5, B * cfg.step_s)
        ok = (m >= max(3, nb // 2)) & (sxx > 0) & np.isfinite(thr) & np.isfinite(prob) & (bank.gap[rows] <= 1)
        prob, ttf = np.where(ok, prob, np.nan), np.where(ok, ttf, np.nan)
        return ok & (slope > 0) & (prob >= 0.5), prob, ttf

    def _preemption_window(self, rows: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """P(more than ``max_preemptions`` in some window ending within the horizon), and the first
        time that is more likely than not; NaN where the window's data are not known.

        At ``t + h`` the window holds the past preemptions younger than the window by then (known
        exactly) plus the new ones since ``t`` (at most a window's worth). Preemptions come in
        bursts (a scrape with several, then quiet), so the new ones are bursts at the recent
        burst rate, uncertain as few bursts were seen, each of the recent mean size; the recent
        past is weighted by age with ``preemption_rate_halflife_s``. The path's probability is
        the largest over ``h`` (the counts ahead are strongly correlated, as for forecasts)."""
        cfg, cat = self.config, self.catalog.preemption_storm
        W, c, step, H = cat.window_s, cat.max_preemptions, cfg.step_s, self.horizon_steps
        ts, vals = self.extractor.preemption_increments(rows)
        n = len(rows)
        with np.errstate(invalid="ignore"):
            age = t - ts                                           # inf where nothing was pushed
            inside = np.isfinite(vals) & (age > -1e-9) & (age < W - 1e-9)
            v = np.where(inside, vals, 0.0)
            # the last future step at which each preemption is still in the window
            stay = np.clip(np.ceil((W - np.where(inside, age, W)) / step - 1e-9) - 1, 0, H).astype(np.int64)
            left = np.zeros((n, H + 1))
            np.add.at(left, (np.repeat(np.arange(n), stay.shape[1]), stay.ravel()), v.ravel())
            known_ahead = np.cumsum(left[:, ::-1], axis=1)[:, ::-1][:, 1:]   # (n, H): h = 1..H
            w = np.where(inside, 0.5 ** (np.where(inside, age, 0.0) / cfg.preemption_rate_halflife_s), 0.0)
            need = c - known_ahead                                 # more than this many new ones
            k = np.floor(np.maximum(need, 0.0))
            hs = np.minimum(np.arange(1, H + 1) * step, W)[None, :]
            expo = (w.sum(axis=1) * step)[:, None]                # weighted seconds watched
            bursts = (w * (v > 0)).sum(axis=1)[:, None]          # weighted scrapes with any
            size = np.maximum((w * v).sum(axis=1)[:, None] / np.maximum(bursts, 1e-12), 1.0)
            # Bursts over the next hs seconds: Poisson at a rate known only from the bursts seen
            # (Gamma posterior: shape = bursts, rate = exposure), i.e. negative binomial. Each
            # burst's size is geometric with the mean seen, so b bursts stay within k
            # preemptions when k Bernoulli(1 / size) trials hold at least b successes.
            pb = expo / (expo + hs)
            shape = np.maximum(bursts, 1e-12)
            within = np.zeros_like(k)                            # P(new preemptions <= k)
            cdf_prev = np.zeros_like(k)
            # (at most 256 bursts: beyond, a storm threshold in the hundreds is read as reached,
            # which errs towards warning)
            for b in range(min(int(k.max()) + 1 if k.size else 0, 256)):
                cdf = betainc(shape, b + 1, pb)                  # negative binomial cdf at b
                # P(Binomial(k, q) >= b) = I_q(b, k - b + 1)
                fit = 1.0 if b == 0 else betainc(b, np.maximum(k - b + 1, 1.0), 1.0 / size)
                within += np.where(b <= k, (cdf - cdf_prev) * fit, 0.0)
                cdf_prev = cdf
                if cdf.min() > 1.0 - 1e-12:                      # no mass left on more bursts
                    break
            p_h = np.where(need < 0, 1.0, np.where(bursts > 0, 1.0 - within, 0.0))
        prob = p_h.max(axis=1)
        ttf = _first_time(p_h >= 0.5, step)
        # at least a third of the window scraped, and the newest scrape known
        ok = (inside.sum(axis=1) * step >= W / 3) & np.isfinite(vals[np.arange(n), np.argmax(ts, axis=1)])
        return np.where(ok, prob, np.nan), np.where(ok, ttf, np.nan)

    def _tail(self, signal: str, k: np.ndarray) -> np.ndarray:
        """P(standardised residual > k): the Gaussian's, or the one learned for ``signal`` (the
        residuals seen so far, mixed with a Gaussian worth ``trend_tail_prior`` observations)."""
        cfg = self.config
        if cfg.trend_tail != "learned" or signal not in self._tail_counts:
            return ndtr(-k)
        sf = self._tail_sf.get(signal)
        if sf is None:
            counts = self._tail_counts[signal]
            above = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # count > each edge
            prior = cfg.trend_tail_prior
            sf = (above + prior * ndtr(-_TAIL_EDGES)) / (counts.sum() + prior)
            self._tail_sf[signal] = sf
        # Linear between edges; beyond them the prior's Gaussian share (never below it).
        out = np.interp(k, _TAIL_EDGES, sf)
        total = self._tail_counts[signal].sum() + cfg.trend_tail_prior
        return np.maximum(out, ndtr(-k) * cfg.trend_tail_prior / total)

    # -- offered load against capacity -----------------------------------------------------------
    def _observe_load(self, rows: np.ndarray, sig: Mapping[str, np.ndarray]) -> None:
        """Push this step's occupancy (running + waiting) and cumulative finished count into the
        arrival rings, and learn the service time from steps where the engine was moving.

        A step with unknown data, or inside a flat spell (a frozen engine freezes its gauges and
        counters; the backlog released after it is no arrival rate either), is stored as NaN,
        so no arrival rate is measured across it, and it teaches nothing about service time.
        """
        if not self.config.use_capacity:
            return
        running, waiting, fin = sig["running"], sig["waiting"], sig["finished"]
        moving = self._flat_k[rows] == 0
        ok = np.isfinite(running) & np.isfinite(waiting) & np.isfinite(fin) & moving
        self._fin_cum[rows] += np.where(np.isfinite(fin), fin, 0.0)
        pos = self._arr_pos[rows]
        self._occ_now[rows] = np.where(ok, running + waiting, np.nan)
        self._arr_cum[rows, pos] = np.where(ok, self._fin_cum[rows] + running + waiting, np.nan)
        self._arr_pos[rows] = (pos + 1) % self._arr_len
        d = self._cap_decay
        # How well did the arrival rate measured arrival_persist_s ago predict the rate since?
        # (A burst that does not last, or a rise that goes on, both show here.)
        step, Wa, P = self.config.step_s, self._arr_w, self._arr_p
        now = self._arr_cum[rows, pos]
        then = self._arr_cum[rows, (pos - P) % self._arr_len]
        before = self._arr_cum[rows, (pos - P - Wa) % self._arr_len]
        with np.errstate(invalid="ignore"):
            x = (then - before) / (Wa * step)
            y = (now - then) / (P * step)
        known = np.isfinite(x) & np.isfinite(y)
        x, y = np.nan_to_num(x), np.nan_to_num(y)
        terms = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
        self._reg[rows] = np.where(known[:, None], d * self._reg[rows] + terms, self._reg[rows])
        self._cap_run[rows] = np.where(ok, d * self._cap_run[rows] + running * self.config.step_s,
                                       self._cap_run[rows])
        self._cap_fin[rows] = np.where(ok, d * self._cap_fin[rows] + fin, self._cap_fin[rows])

    def _capacity(self, rows: np.ndarray, sig: Mapping[str, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(queue overload within the horizon) from offered load against learned capacity.

        Arrival rate: requests finished over the last ``arrival_window_s`` plus the change in
        running + waiting, per second (what entered the server). Service time per running
        request: decayed request-seconds in service / decayed finished count (Little's law on
        the running set), learned from this instance's own history; capacity = running-request
        limit / service time. With the current arrival rate held constant (no trend: a rise may
        stop), the fluid queue fills the running set (occupancy approaches arrivals x service
        time) and, when arrivals exceed capacity, grows at their difference; the overload
        threshold is reached after

            t1 = W ln((lam W - L0) / (lam W - limit))   (only while L0 < limit)
            t2 = (limit + threshold - max(L0, limit)) / (lam - mu)

        and never when lam <= mu. The arrival rate's uncertainty (Poisson counts over the
        window, plus the service time's, from the finished count it rests on) is integrated
        by Gauss-Hermite quadrature. Returns (arrivals over capacity, probability, time to
        failure), NaN where too little data (no full window since the last gap or frozen spell,
        too few finished requests, or an unknown running-request limit).
        """
        cfg = self.config
        n = len(rows)
        nan = np.full(n, np.nan)
        pos = self._arr_pos[rows]
        back = (pos[:, None] - 1 - np.arange(self._arr_w + 1)[None, :]) % self._arr_len
        recent = self._arr_cum[rows[:, None], back]          # newest first, arrival window + 1
        complete = np.isfinite(recent).all(axis=1)
        occ_now = self._occ_now[rows]
        window = self._arr_w * cfg.step_s
        q = self.catalog.queue_overload
        limit = (np.full(n, float(q.running_limit)) if q.running_limit is not None
                 else np.asarray(sig["running_limit"], dtype=float))
        thr = np.asarray(self.catalog.threshold("queue_overload", sig), dtype=float)
        H = cfg.horizon_s
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            lam = np.maximum((recent[:, 0] - recent[:, -1]) / window, 0.0)
            n_fin = self._cap_fin[rows]
            W = self._cap_run[rows] / n_fin
            mu = limit / W
            # What the measured rate says about the rate to come, learned from this instance's
            # history: a short burst at a steady load does not last (slope ~0, the prediction
            # stays near the usual rate), a rise that has gone on does (slope ~1).
            rn, rx, ry, rxx, rxy, ryy = (self._reg[rows, i] for i in range(6))
            xm, ym = rx / rn, ry / rn
            vx = np.maximum(rxx / rn - xm * xm, 1e-12)
            cxy = rxy / rn - xm * ym
            vy = np.maximum(ryy / rn - ym * ym, 0.0)
            beta = cxy / vx
            resid = np.maximum(vy - beta * cxy, 0.0) * rn / np.maximum(rn - 2.0, 1.0)
            pred = ym + beta * (lam - xm)
            var_pred = resid * (1.0 + 1.0 / rn + (lam - xm) ** 2 / (rn * vx))
            if cfg.arrival_model == "measured":
                pred, var_pred = lam, lam / window
            sd = np.sqrt(var_pred + mu * mu / n_fin)
            need = np.maximum(limit + thr - np.maximum(occ_now, limit), 0.0)   # requests to queue

            def time_to_overload(lq: np.ndarray) -> np.ndarray:
                lw = lq * W
                t1 = np.where(occ_now < limit, W * np.log((lw - occ_now) / (lw - limit)), 0.0)
                t2 = need / (lq - mu)
                tt = np.maximum(t1, 0.0) + t2
                return np.where((lq > mu) & np.isfinite(tt), tt, np.inf)

            # The time to overload falls as the arrival rate grows: the lowest rate that overloads
            # within the horizon, by bisection (the crossing rate lies between mu and mu + the
            # whole backlog over a fraction of the horizon).
            lo = mu.copy()
            hi = mu + (need + limit) / (0.25 * H) + 1e-9
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                fast = time_to_overload(mid) <= H
                hi, lo = np.where(fast, mid, hi), np.where(fast, lo, mid)
            prob = ndtr((pred - hi) / np.maximum(sd, 1e-9))
            tt = time_to_overload(np.maximum(pred, 0.0))
            ttf = np.where(tt <= H, np.maximum(np.ceil(tt / cfg.step_s), 1) * cfg.step_s, np.nan)
        ok = (complete & (n_fin >= cfg.capacity_min_finished) & (W > 0) & np.isfinite(W) & np.isfinite(sd)
              & (rn >= 10)
              & np.isfinite(limit) & (limit > 0) & np.isfinite(thr) & np.isfinite(lam))
        prob, ttf = np.where(ok, prob, nan), np.where(ok, ttf, nan)
        return ok & (pred > mu), prob, ttf

    def _memory_trend(self, rows: np.ndarray, full: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The "memory steady slope" precursor and what it implies (``full=False``: the
        precursor alone, as ingesting history needs; probability and time stay NaN).

        A leak shows as a straight climb: least squares over the recent memory points with a
        positive slope and R^2 above the bar. Where it holds, the regression's own prediction
        interval at the horizon gives P(limit reached) and the crossing point a time to failure:
        (active, probability, time to failure in seconds), NaN where not active.
        """
        n = len(rows)
        bank = self.banks.get("memory_fraction")
        nan = np.full(n, np.nan)
        if bank is None:
            return np.zeros(n, dtype=bool), nan, nan
        cfg, H = self.config, self.horizon_steps
        if not (bank.hlen[rows] > 0).any():
            return np.zeros(n, dtype=bool), nan, nan  # no memory data at all (vLLM series only)
        # Only the last N points of each ring: gather them rather than scanning the whole ring.
        back = np.arange(min(cfg.memory_slope_points, bank.history))
        y = bank.last_points(rows, back)
        use = (back[None, :] < bank.hlen[rows][:, None]) & np.isfinite(y)
        x = -np.broadcast_to(back, y.shape).astype(float)  # steps relative to now
        m = use.sum(axis=1).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            xm = np.where(use, x, 0).sum(axis=1) / m
            ym = np.where(use, y, 0).sum(axis=1) / m
            dx, dy = np.where(use, x - xm[:, None], 0), np.where(use, y - ym[:, None], 0)
            sxx, syy, sxy = (dx * dx).sum(axis=1), (dy * dy).sum(axis=1), (dx * dy).sum(axis=1)
            slope = sxy / sxx
            r2 = sxy * sxy / (sxx * syy)
            active = (m >= 10) & (sxy > 0) & (r2 >= cfg.memory_slope_r2)
            if not full:
                return active, nan, nan
            s2 = np.maximum(syy - slope * sxy, 0.0) / np.maximum(m - 2, 1)
            pred = ym + slope * (H - xm)
            se = np.sqrt(s2 * (1 + 1 / m + (H - xm) ** 2 / sxx))
            prob = ndtr((pred - 1.0) / np.maximum(se, 1e-12))  # memory_fraction's limit is 1
            steps = np.ceil((1.0 - ym) / slope + xm)
            ttf = np.where((steps >= 1) & (steps <= H), steps * cfg.step_s, np.nan)
        return active, np.where(active, prob, np.nan), np.where(active, ttf, np.nan)

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
                if ok.any() and f == "preemption_storm" and cfg.preemption_model == "window_rate":
                    # the window's own model instead of the generic forecast of the windowed count
                    wp, wt = self._preemption_window(rows[ok], t)
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
                    ttf[ok, j] = _first_time(p_h >= 0.5, cfg.step_s)
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
                sp, ss = self.stall_probability(self._flat_k[rows])
                known = np.isfinite(sig["flat_seconds"]) & warm
                flat = known & (self._flat_k[rows] > 0)
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
        cfg = self.config
        if cfg.max_refits_per_step <= 0 or not self._rows:
            return 0
        active = np.fromiter(self._rows.values(), dtype=np.int64)
        cands: list[tuple[tuple[float, float, float], str, int, bool]] = []
        for s, bank in self.banks.items():
            hlen = bank.hlen[active]
            fitted_at = bank.fitted_at[active]
            never = ~np.isfinite(fitted_at)
            grown = hlen >= 2 * self._fit_n[s][active]          # fit on 30, 60, 120... points
            old = t - fitted_at >= cfg.refit_every_s
            surprise = bank.surprise(active)
            shifted = (surprise >= cfg.regime_surprise) & (t - fitted_at >= cfg.min_refit_interval_s)
            due = (bank.nobs[active] >= cfg.min_fit_points) & (never | grown | old | shifted)
            regime = shifted & ~never & ~grown & ~old
            for r, sp, rg in zip(active[due], surprise[due], regime[due]):
                key = (0.0 if not np.isfinite(bank.fitted_at[r]) else 1.0, -float(sp), float(bank.fitted_at[r]))
                cands.append((key, s, int(r), bool(rg)))
        if not cands:
            return 0
        cands.sort(key=lambda c: c[0])
        deadline = time.perf_counter() + cfg.refit_time_budget_s if cfg.refit_time_budget_s else None
        done = 0
        for _, s, r, regime in cands[: cfg.max_refits_per_step]:
            if deadline is not None and time.perf_counter() > deadline:
                break
            self._fit_row(s, r, t, recent_only=regime)
            done += 1
        self.refits += done
        if done:
            self._pool_defaults(active)
        return done

    def _pool_defaults(self, active: np.ndarray) -> None:
        """Series not fit yet borrow the fleet's typical parameters for their signal.

        With thousands of series, individual fits take many cycles to reach everyone; until then
        the median parameters of the most often selected model (among this signal's fitted
        series) beat the generic defaults. Drift terms are per-series, so they are not pooled.
        """
        for s, bank in self.banks.items():
            fitted = active[bank.model[active] >= 0]
            if len(fitted) < self.config.pool_min_fits:
                continue
            codes, counts = np.unique(bank.model[fitted], return_counts=True)
            top = fitted[bank.model[fitted] == codes[np.argmax(counts)]]
            alpha = float(np.median(bank.alpha[top]))
            p = Innovations(alpha=alpha, beta=min(float(np.median(bank.beta[top])), alpha),
                            d=float(np.median(bank.d[top])), phi=float(np.median(bank.phi[top])), c=0.0)
            bank.set_default(p, active[bank.model[active] < 0])

    def _fit_row(self, s: str, row: int, t: float, recent_only: bool = False) -> None:
        bank = self.banks[s]
        y = bank.recent(row)
        if not recent_only:
            self._fit_n[s][row] = len(y)
        else:
            y = y[-self.config.regime_fit_points:]
        model = select_model(y, self.config.candidates.get(s, ["damped_holt", "ses"]))
        if model is None:
            bank.fitted_at[row] = t  # nothing fits: wait for the regular schedule
            return
        ok = np.flatnonzero(np.isfinite(y))
        trailing = y[ok[-1] + 1:] if len(ok) else y[:0]
        p = model.innovations()
        level, slope, _ = filter_series(p, trailing, model.level, model.slope)  # carry over a current gap
        bank.set_model(row, p, level, slope, model.sigma2, self._model_names.index(model.name), t)
