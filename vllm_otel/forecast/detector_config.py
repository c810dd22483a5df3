"""DetectorConfig: every setting of the failure detector, validated when it is loaded.

Why each default is what it is, with the recordings behind it: ``docs/decisions/`` (0005 to 0010).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_otel.forecast.failures import FAILURE_TYPES, FailureCatalog
from vllm_otel.forecast.models import MODELS, get_model
from vllm_otel.forecast.precursors.load_trend import TREND_PRECURSORS
from vllm_otel.forecast.signals import InputSeries
from vllm_otel.forecast.stategraph import BASE_STATES, GraphPrior

__all__ = ["DetectorConfig", "DEFAULT_CANDIDATES"]

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
    # States that say nothing about where this instance is heading now: from them the graph's
    # probability is published only where nothing else predicts the failure, never raising a
    # model's probability. Windowed failures (TTFT-SLO breach, preemption storm) stay failure
    # states for a whole window after their cause has gone, so they mark recoveries as much as
    # the next overload (decision 0008).
    graph_silent_states: list[str] = Field(default_factory=lambda: [
        "no_data", "idle", "serving", "ttft_slo_breach", "preemption_storm"])
    kv_high_fraction: float = Field(0.9, gt=0.0, le=1.0, description="of the KV threshold: precursor")
    thermal_margin_c: float = Field(5.0, ge=0.0)
    memory_slope_points: int = Field(60, ge=5)
    memory_slope_r2: float = Field(0.9, gt=0.0, le=1.0)
    # Trend precursors on load signals (KV usage, waiting requests): see precursors/load_trend.py.
    trend_window_s: float = Field(60.0, gt=0.0, description="recent data the load trend is fit on")
    trend_block_s: float = Field(5.0, gt=0.0, description="averaged into blocks this long first")
    trend_signals: list[str] = Field(default_factory=lambda: list(TREND_PRECURSORS))
    # A rise that ended in its failure is over: the trend is fit only on data since the signal's
    # failure last ended (decision 0007).
    trend_after_failure_only: bool = True
    # A frozen engine starts a new regime: the trend is fit only on data since tokens last flowed
    # after a flat spell at least this long. Shorter spells (a missed or repeated scrape) only
    # drop their own samples (decision 0007).
    trend_freeze_s: float = Field(5.0, ge=0.0, description="a flat spell this long cuts the trend's history")
    # How far the noise around the trend line reaches: "learned" from the standardised residuals
    # seen (per signal, fleet-wide, from a Gaussian worth trend_tail_prior observations), or
    # "gaussian". Load signals are heavy-tailed, so a Gaussian tail says "safe" until the mean
    # itself is nearly at the threshold (decision 0009).
    trend_tail: str = Field("learned", pattern="^(learned|gaussian)$")
    trend_tail_prior: float = Field(200.0, gt=0.0)
    # Engine stalls: a flat spell of k steps reaches the stall definition with a probability
    # learned from the spells seen so far (fleet-wide), from a prior mean of k / (steps that
    # make a stall) with this many pseudo-spells.
    stall_prior_strength: float = Field(2.0, gt=0.0)
    # With no flat spell under way, P(engine_stall) is the fleet's rate of stall onsets per
    # flowing instance-step, over the horizon. It starts from this many horizons of stall-free
    # exposure, so the first stalls seen do not alarm the whole fleet (decision 0010).
    stall_base_prior_horizons: float = Field(10.0, ge=0.0)
    # Queue overload from offered load against capacity (precursors/offered_load.py; decision 0005).
    use_capacity: bool = True
    # Arrivals are Poisson-like counts: over W seconds at a rate lam the measured rate is off by
    # sqrt(lam / W), while a rise at slope s is seen s W / 2 late (decision 0005).
    arrival_window_s: float = Field(20.0, gt=0.0, description="arrivals are counted over this window")
    capacity_halflife_s: float = Field(120.0, gt=0.0, description="memory of the learned service time")
    capacity_min_finished: float = Field(10.0, gt=0.0, description="finished requests (decayed) "
                                                                   "before the service time is trusted")
    arrival_persist_s: float = Field(30.0, gt=0.0, description="the rate over this much of the future "
                                                               "is predicted from the measured arrival "
                                                               "rate by a regression learned per instance")
    # Preemption storms: the window's own model (precursors/preemption.py; decision 0006).
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
