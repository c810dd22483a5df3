"""Forecasting models, registered by name: statsmodels estimates, our state space updates.

Every model has a validated parameters object, ``fit(y)`` (maximum likelihood through
statsmodels: ``ETSModel`` for the exponential-smoothing family, ``SARIMAX`` for ARIMA), cheap
``update(y)`` with fixed parameters, and ``predict(steps)`` returning mean and standard
deviation. All of them reduce to the shared innovations form of
:mod:`vllm_otel.forecast.statespace`, which is what lets thousands of series be kept current
between refits with vectorised numpy.

Model choice: :func:`select_model` fits the candidates and keeps the lowest AIC. statsmodels'
own AICs are not comparable across families (ETS is a likelihood of ``y``, ARIMA of its
differences, with different initialisations), so we compute one conditional AIC for all of them
from the one-step errors on the same observations, ``m*log(SSE/m) + 2k``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_otel.forecast.statespace import Innovations, filter_series, forecast_moments

__all__ = [
    "Forecast", "ForecastModel", "ModelParams", "SESParams", "HoltParams", "DampedHoltParams",
    "ArimaParams", "MODELS", "register_model", "get_model", "select_model", "prepare_series",
    "residual_autocorrelation",
]

_BURN = 2  # errors before this index are left out of the AIC, so every model is scored on the same points


@dataclass(frozen=True)
class Forecast:
    mean: np.ndarray  # (steps,)
    std: np.ndarray   # (steps,)


class ModelParams(BaseModel):
    """Parameters common to every model; subclasses add the model's own (validated) ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma2: float | None = Field(None, ge=0.0, description="innovation variance; None: learned online")


class SESParams(ModelParams):
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class HoltParams(ModelParams):
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    beta: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _admissible(self) -> "HoltParams":
        if self.beta > self.alpha:  # statsmodels' bound; outside it the slope outruns the level
            raise ValueError("beta must not exceed alpha")
        return self


class DampedHoltParams(HoltParams):
    phi: float = Field(0.98, ge=0.5, le=1.0)


class ArimaParams(ModelParams):
    """ARIMA(1,1,1): ``diff(y) = intercept + ar*diff(y)[-1] + e + ma*e[-1]`` (intercept: the drift
    term, 0 for the drift-free ``arima``)."""

    ar: float = Field(0.0, gt=-1.0, lt=1.0)
    ma: float = Field(0.0, gt=-1.0, lt=1.0)
    intercept: float = 0.0


MODELS: dict[str, type["ForecastModel"]] = {}
M = TypeVar("M", bound="type[ForecastModel]")


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make a model available by name (for config and selection)."""
    def deco(cls: M) -> M:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls
    return deco


def get_model(name: str, params: ModelParams | dict[str, Any] | None = None) -> "ForecastModel":
    """A model by registered name, its parameters validated now (not at first use)."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
    return cls(params)


def prepare_series(y: Sequence[float] | np.ndarray) -> np.ndarray:
    """Float array for fitting: interior gaps linearly interpolated, leading/trailing NaN dropped."""
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y)
    if not ok.any():
        return y[:0]
    first, last = np.argmax(ok), len(y) - np.argmax(ok[::-1])
    y, ok = y[first:last], ok[first:last]
    if not ok.all():
        idx = np.arange(len(y))
        y = np.interp(idx, idx[ok], y[ok])
    return y


class ForecastModel(ABC):
    """Base class: subclasses estimate with statsmodels and express themselves in innovations form."""

    name: ClassVar[str] = ""
    params_type: ClassVar[type[ModelParams]] = ModelParams
    n_params: ClassVar[int] = 0  # estimated coefficients, initial states included (for the AIC)
    min_points: ClassVar[int] = 10

    def __init__(self, params: ModelParams | dict[str, Any] | None = None):
        if isinstance(params, ModelParams):
            params = params.model_dump()
        self.params = self.params_type.model_validate(params or {})
        self.level = math.nan
        self.slope = self.innovations().initial_slope()
        self.sigma2 = self.params.sigma2 if self.params.sigma2 is not None else math.nan
        self.nobs = 0
        self.aic: float | None = None

    # -- what subclasses provide ------------------------------------------------------------
    @abstractmethod
    def innovations(self) -> Innovations:
        """The model in the shared state-space form."""

    @abstractmethod
    def _estimate(self, y: np.ndarray) -> tuple[ModelParams, float, float, int]:
        """statsmodels MLE: (params, initial level, initial slope, index of first observation the
        recursion starts from)."""

    # -- the common machinery ------------------------------------------------------------
    def fit(self, y: Sequence[float] | np.ndarray) -> "ForecastModel":
        """Estimate parameters on ``y`` (gaps interpolated) and leave the state at its end."""
        y = prepare_series(y)
        if len(y) < self.min_points:
            raise ValueError(f"{self.name}: {len(y)} points, need {self.min_points}")
        with warnings.catch_warnings():
            # Convergence chatter from the optimiser on short or flat series is expected here;
            # the AIC comparison is what judges the result.
            warnings.simplefilter("ignore")
            params, level0, slope0, start = self._estimate(y)
        self.params = params
        level, slope, errors = filter_series(self.innovations(), y[start:], level0, slope0)
        e = errors[max(_BURN - start, 0):]
        e = e[np.isfinite(e)]
        if len(e) == 0 or not np.isfinite([level, slope]).all():
            raise ValueError(f"{self.name}: fit produced no usable state")
        sse = float(np.sum(e * e))
        m = len(e)
        self.level, self.slope, self.nobs = level, slope, len(y)
        self.sigma2 = sse / m
        self.aic = m * math.log(max(sse / m, 1e-300)) + 2 * self.n_params
        return self

    def update(self, y: float | Sequence[float] | np.ndarray) -> None:
        """Observe new values with fixed parameters (NaN = gap); sigma2 stays as fitted."""
        y = np.atleast_1d(np.asarray(y, dtype=float))
        if not np.isfinite(self.level):
            ok = np.flatnonzero(np.isfinite(y))
            if not len(ok):
                return
            self.level, y = float(y[ok[0]]), y[ok[0] + 1:]
            self.nobs += 1
        self.level, self.slope, errors = filter_series(self.innovations(), y, self.level, self.slope)
        self.nobs += int(np.isfinite(y).sum())
        if not np.isfinite(self.sigma2):
            e = errors[np.isfinite(errors)]
            if len(e):
                self.sigma2 = float(np.mean(e * e))

    def predict(self, steps: int) -> Forecast:
        if not np.isfinite(self.level):
            raise ValueError(f"{self.name}: no observation yet")
        p = self.innovations()
        sigma2 = self.sigma2 if np.isfinite(self.sigma2) else 0.0
        mean, std = forecast_moments(np.array([self.level]), np.array([self.slope]), np.array([sigma2]),
                                     p.alpha, p.beta, p.d, p.phi, p.c, int(steps))
        return Forecast(mean[0], std[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r}, aic={self.aic})"


def _ets(y: np.ndarray, trend: str | None, damped: bool) -> Any:
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    # A pandas Series, not an array: with pandas 3, ETSModel results built on numpy input break
    # in get_prediction, and callers may want that.
    return ETSModel(pd.Series(y), error="add", trend=trend, damped_trend=damped).fit(disp=False)


@register_model("ses")
class SimpleExponentialSmoothing(ForecastModel):
    """ETS(A,N,N): a level that follows the data; for flat, noisy signals."""

    params_type = SESParams
    n_params = 2

    def innovations(self) -> Innovations:
        return Innovations(alpha=self.params.alpha, beta=0.0, d=0.0, phi=0.0)

    def _estimate(self, y: np.ndarray) -> tuple[ModelParams, float, float, int]:
        r = _ets(y, None, False)
        p = dict(zip(r.param_names, np.asarray(r.params)))
        return SESParams(alpha=float(p["smoothing_level"])), float(p["initial_level"]), 0.0, 0


@register_model("holt")
class Holt(ForecastModel):
    """ETS(A,A,N): level and slope; for steady climbs (memory leaks)."""

    params_type = HoltParams
    n_params = 4

    def innovations(self) -> Innovations:
        return Innovations(alpha=self.params.alpha, beta=self.params.beta, d=1.0, phi=1.0)

    def _estimate(self, y: np.ndarray) -> tuple[ModelParams, float, float, int]:
        r = _ets(y, "add", False)
        p = dict(zip(r.param_names, np.asarray(r.params)))
        a, b = float(p["smoothing_level"]), float(p["smoothing_trend"])
        return HoltParams(alpha=a, beta=min(b, a)), float(p["initial_level"]), float(p["initial_trend"]), 0


@register_model("damped_holt")
class DampedHolt(ForecastModel):
    """ETS(A,Ad,N): a slope that fades; the safe default for bounded, mean-reverting load signals."""

    params_type = DampedHoltParams
    n_params = 5

    def innovations(self) -> Innovations:
        phi = self.params.phi
        return Innovations(alpha=self.params.alpha, beta=self.params.beta, d=phi, phi=phi)

    def _estimate(self, y: np.ndarray) -> tuple[ModelParams, float, float, int]:
        r = _ets(y, "add", True)
        p = dict(zip(r.param_names, np.asarray(r.params)))
        a, b = float(p["smoothing_level"]), float(p["smoothing_trend"])
        params = DampedHoltParams(alpha=a, beta=min(b, a), phi=float(p["damping_trend"]))
        return params, float(p["initial_level"]), float(p["initial_trend"]), 0


@register_model("arima")
class Arima(ForecastModel):
    """ARIMA(1,1,1) without drift, estimated by statsmodels SARIMAX on the differences.

    Pays where changes are autocorrelated (bursty queues, oscillating load) in a way exponential
    smoothing cannot express; the selection only keeps it when its AIC says so. No drift term:
    on a bounded load signal a drift fitted over a window that holds one rise extrapolates that
    rise for ever. On a recorded queue_ramp_slow, the drift fitted across the first overflow
    (0 -> 72 waiting) held P(queue_overload) at 0.66-0.73 for four minutes of an idle or lightly
    loaded engine. Rising trends are the (damped) Holt models' job, whose slope adapts.
    """

    params_type = ArimaParams
    n_params = 2
    min_points = 20
    drift: ClassVar[bool] = False

    def innovations(self) -> Innovations:
        p = self.params
        return Innovations(alpha=1.0, beta=p.ar + p.ma, d=1.0, phi=p.ar, c=p.intercept)

    def _estimate(self, y: np.ndarray) -> tuple[ModelParams, float, float, int]:
        from statsmodels.tsa.statespace.sarimax import SARIMAX

        dy = pd.Series(np.diff(y))
        # concentrate_scale drops sigma2 from the optimiser's parameters; a capped iteration count
        # bounds the cost (the estimate is refined at the next scheduled refit anyway).
        r = SARIMAX(dy, order=(1, 0, 1), trend="c" if self.drift else "n",
                    concentrate_scale=True).fit(disp=False, maxiter=50)
        p = dict(zip(r.param_names, np.asarray(r.params)))
        ar = float(np.clip(p["ar.L1"], -0.99, 0.99))
        ma = float(np.clip(p["ma.L1"], -0.99, 0.99))
        params = ArimaParams(ar=ar, ma=ma, intercept=float(p.get("intercept", 0.0)))
        drift = params.intercept / (1.0 - ar)
        # The recursion starts with y[0] known and the expected first difference equal to the drift.
        return params, float(y[0]), drift, 1


@register_model("arima_drift")
class ArimaDrift(Arima):
    """ARIMA(1,1,1) with drift: for series that do climb for long (not a default candidate)."""

    n_params = 3
    drift = True


def _is_arima(name: str) -> bool:
    """ARIMA models (any registered subclass) are tried last, and only where smoothing leaves
    autocorrelated errors."""
    cls = MODELS.get(name)
    return cls is not None and issubclass(cls, Arima)


def residual_autocorrelation(model: ForecastModel, y: np.ndarray) -> float:
    """Lag-1 autocorrelation of a fitted model's one-step errors on ``y``."""
    start_level, start_slope = _start_state(model, y)
    _, _, e = filter_series(model.innovations(), y, start_level, start_slope)
    e = e[np.isfinite(e)][10:]  # past the start-up transient of re-filtering from y[0]
    if len(e) < 3 or not np.any(e):
        return 0.0
    e = e - e.mean()
    den = float(np.dot(e, e))
    return float(np.dot(e[1:], e[:-1]) / den) if den > 0 else 0.0


def _start_state(model: ForecastModel, y: np.ndarray) -> tuple[float, float]:
    # Re-filtering from the first point is enough to judge the error structure.
    return float(y[0]), model.innovations().initial_slope()


def select_model(y: Sequence[float] | np.ndarray, candidates: Sequence[str]) -> ForecastModel | None:
    """Fit each candidate on ``y`` and return the one with the lowest comparable AIC.

    ARIMA is tried only where it can pay: when the best other candidate leaves autocorrelated
    errors (lag-1 autocorrelation beyond 2/sqrt(n)), the structure exponential smoothing cannot
    express. Its fit costs several times an ETS fit, so this keeps refits affordable.

    A constant series gets a simple-smoothing model with zero variance without any fitting (every
    optimiser struggles on it, and there is nothing to learn). None when nothing could be fit.
    """
    arr = prepare_series(y)
    if len(arr) == 0:
        return None
    if np.ptp(arr) == 0.0:
        m = SimpleExponentialSmoothing(SESParams(alpha=0.5, sigma2=0.0))
        m.level, m.sigma2, m.nobs, m.aic = float(arr[-1]), 0.0, len(arr), -math.inf
        return m
    best: ForecastModel | None = None
    for name in sorted(candidates, key=_is_arima):  # stable: ARIMA models last, order kept
        if best is not None and _is_arima(name):
            if abs(residual_autocorrelation(best, arr)) <= 2.0 / math.sqrt(len(arr)):
                continue
        model = get_model(name)
        if len(arr) < model.min_points:
            continue
        try:
            model.fit(arr)
        except Exception:  # noqa: BLE001 - statsmodels raises assorted types on degenerate data
            continue
        if model.aic is not None and np.isfinite(model.aic) and (best is None or model.aic < best.aic):
            best = model
    return best
