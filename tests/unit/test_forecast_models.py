"""Models: registry, validated parameters, and agreement with statsmodels' own forecasts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from vllm_otel.forecast.models import MODELS, get_model, select_model
from vllm_otel.forecast.statespace import Innovations, InnovationsBank

RNG = np.random.default_rng(7)
WALK = 0.3 + np.cumsum(RNG.normal(0.002, 0.01, 240))


def test_registry_and_validated_params() -> None:
    assert {"ses", "holt", "damped_holt", "arima", "arima_drift"} <= set(MODELS)
    with pytest.raises(KeyError, match="unknown model"):
        get_model("prophet")
    with pytest.raises(ValidationError):
        get_model("damped_holt", {"alpha": 1.5})
    with pytest.raises(ValidationError):
        get_model("holt", {"alpha": 0.1, "beta": 0.5})  # slope faster than level: not admissible
    with pytest.raises(ValidationError):
        get_model("ses", {"alpha": 0.5, "bogus": 1})


@pytest.mark.parametrize("damped", [False, True])
def test_ets_forecast_matches_statsmodels(damped: bool) -> None:
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    model = get_model("damped_holt" if damped else "holt").fit(WALK)
    ours = model.predict(5)
    ref = ETSModel(pd.Series(WALK), error="add", trend="add", damped_trend=damped).fit(disp=False)
    frame = ref.get_prediction(start=len(WALK), end=len(WALK) + 4).summary_frame(alpha=0.05)
    np.testing.assert_allclose(ours.mean, frame["mean"].to_numpy(), rtol=1e-6)
    # Same variance formula; sigma2 differs only by statsmodels' mse over all points vs ours
    # over the common AIC sample.
    ref_std = (frame["mean"] - frame["pi_lower"]).to_numpy() / 1.959964
    np.testing.assert_allclose(ours.std, ref_std, rtol=0.05)


@pytest.mark.parametrize("name", ["arima", "arima_drift"])
def test_arima_forecast_matches_sarimax(name: str) -> None:
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    model = get_model(name).fit(WALK)
    p = model.params
    drift = name == "arima_drift"
    ref = SARIMAX(pd.Series(np.diff(WALK)), order=(1, 0, 1), trend="c" if drift else "n")
    res = ref.smooth(([p.intercept] if drift else []) + [p.ar, p.ma, model.sigma2])
    expected = WALK[-1] + np.cumsum(res.forecast(4).to_numpy())
    np.testing.assert_allclose(model.predict(4).mean, expected, atol=2e-3)


def test_arima_for_load_signals_does_not_extrapolate_a_past_rise() -> None:
    """A queue fitted while it was overflowing (calm, then 0 -> 70 waiting), then drained and
    idle: the drift-free ARIMA (the default candidate) forecasts an idle queue; with a drift
    term, the rise in the fit window goes on for ever (past 32 waiting within 120 steps, as on
    a recorded queue_ramp_slow, where it held P(queue_overload) near 0.7 on an idle engine)."""
    rng = np.random.default_rng(5)
    y = np.concatenate([rng.poisson(1.0, 120).astype(float),
                        np.maximum(np.linspace(0, 70, 40) + rng.normal(0, 3, 40), 0), np.zeros(75)])
    means = {}
    for name in ("arima", "arima_drift"):
        model = get_model(name).fit(y[:160])
        model.update(y[160:])
        means[name] = model.predict(120).mean
    assert np.abs(means["arima"]).max() < 1.0
    assert means["arima_drift"][-1] > 32.0


def test_update_is_the_fixed_parameter_recursion() -> None:
    model = get_model("damped_holt").fit(WALK[:200])
    fixed = get_model("damped_holt", model.params)
    fixed.level, fixed.slope, fixed.sigma2 = model.level, model.slope, model.sigma2
    model.update(WALK[200:])
    fixed.update(WALK[200:])
    assert model.level == pytest.approx(fixed.level)
    gap = get_model("ses", {"alpha": 0.5})
    gap.update([1.0, np.nan, 3.0])  # a gap only propagates the state
    assert gap.level == pytest.approx(2.0)


def test_selection_by_comparable_aic() -> None:
    trend = 0.1 + 0.004 * np.arange(200) + RNG.normal(0, 0.002, 200)
    best = select_model(trend, ["ses", "holt", "damped_holt"])
    assert best is not None and best.name in ("holt", "damped_holt")
    flat = 0.5 + RNG.normal(0, 0.02, 200)
    assert select_model(flat, ["ses", "damped_holt"]).predict(10).mean[-1] == pytest.approx(0.5, abs=0.02)
    const = select_model(np.full(50, 3.0), ["damped_holt"])
    assert const is not None and const.sigma2 == 0 and const.predict(3).mean[0] == 3.0
    assert select_model([np.nan] * 5, ["ses"]) is None
    assert select_model([1.0, 2.0, 3.0], ["holt"]) is None  # too short for any candidate


def test_bank_vectorised_equals_single_model() -> None:
    p = Innovations(alpha=0.4, beta=0.05, d=0.95, phi=0.95)
    bank = InnovationsBank(p, history=50, capacity=2)
    single = get_model("damped_holt", {"alpha": 0.4, "beta": 0.05, "phi": 0.95})
    ys = np.stack([WALK[:40], WALK[40:80]])
    for k in range(40):
        bank.update(np.array([0, 1]), ys[:, k])
    single.update(ys[0])
    mean, std = bank.forecast(np.array([0, 1]), 6)
    assert mean[0] == pytest.approx(single.predict(6).mean)
    np.testing.assert_allclose(bank.recent(1), ys[1])
    assert np.all(np.diff(std[0]) > 0)  # uncertainty grows with the horizon
