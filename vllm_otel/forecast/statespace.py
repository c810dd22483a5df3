"""One innovations state space for every model we fit, updated and forecast with numpy over many series.

Exponential smoothing (simple, Holt, damped Holt) and ARIMA(1,1,1) with drift are all special
cases of a two-state single-source-of-error model::

    forecast   y_hat = l + d*b
    error      e     = y - y_hat
    level      l'    = y_hat + alpha*e
    slope      b'    = c + phi*b + beta*e

ETS(A,Ad,N): d = phi, c = 0. Holt: d = phi = 1. SES: beta = 0 and b = 0. ARIMA(1,1,1) with
drift mu, AR phi, MA theta, written in innovations form: alpha = 1, d = 1, beta = phi + theta,
c = (1 - phi)*mu (b is then the expected next difference).

With that form, the h-step mean and variance have closed forms (Hyndman et al., "Forecasting with
exponential smoothing", class 1 models)::

    mean_h = l + d * sum_{j<h} b_j,   b_0 = b, b_j = c + phi*b_{j-1}
    var_h  = sigma2 * (1 + sum_{j=1}^{h-1} c_j^2),   c_j = alpha + d*beta*sum_{i<j} phi^i

so statsmodels only has to *estimate* parameters (rarely); keeping the state current and
forecasting is a few vectorised numpy operations per step for all series at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_otel.forecast.rows import row_index, shared_position

__all__ = ["Innovations", "InnovationsBank", "filter_series", "forecast_moments"]


@dataclass(frozen=True)
class Innovations:
    """Parameters of the shared form (see the module docstring)."""

    alpha: float
    beta: float = 0.0
    d: float = 1.0
    phi: float = 1.0
    c: float = 0.0

    def initial_slope(self) -> float:
        """Slope to start from without history: the drift for ARIMA, flat otherwise."""
        return self.c / (1.0 - self.phi) if self.phi < 1.0 and self.c else 0.0


def forecast_moments(level: np.ndarray, slope: np.ndarray, sigma2: np.ndarray, alpha: np.ndarray,
                     beta: np.ndarray, d: np.ndarray, phi: np.ndarray, c: np.ndarray,
                     steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation for 1..steps ahead, shapes (n, steps)."""
    level, slope = np.atleast_1d(level), np.atleast_1d(slope)
    col = lambda a: np.atleast_1d(np.asarray(a, dtype=float))[:, None]  # noqa: E731
    powers = col(phi) ** np.arange(steps)[None, :]              # phi^0 .. phi^(H-1)
    cum = np.cumsum(powers, axis=1)                             # sum_{i<=j} phi^i
    before = cum - powers                                       # sum_{i<j} phi^i
    b_j = powers * col(slope) + col(c) * before                 # expected slope j steps on
    mean = col(level) + col(d) * np.cumsum(b_j, axis=1)
    c_j = col(alpha) + col(d) * col(beta) * cum[:, : steps - 1]  # j = 1 .. H-1
    var_mult = np.concatenate([np.ones((len(level), 1)), 1.0 + np.cumsum(c_j ** 2, axis=1)], axis=1)
    std = np.sqrt(np.maximum(col(sigma2), 0.0) * var_mult)
    return mean, std


def filter_series(p: Innovations, y: np.ndarray, level: float,
                  slope: float) -> tuple[float, float, np.ndarray]:
    """Run the recursion over one series from a given state; NaN observations only propagate.

    Returns the final state and the one-step errors (NaN where y was NaN).
    """
    errors = np.full(len(y), np.nan)
    a, b_, d, phi, c = p.alpha, p.beta, p.d, p.phi, p.c
    for i, v in enumerate(y):
        yhat = level + d * slope
        if v == v:  # not NaN
            e = v - yhat
            errors[i] = e
            level, slope = yhat + a * e, c + phi * slope + b_ * e
        else:
            level, slope = yhat, c + phi * slope
    return level, slope, errors


class InnovationsBank:
    """State and parameters for many series (one row each), updated together every step.

    Rows without a fitted model use the bank's default parameters. Besides the state, each row
    keeps a ring of its recent observations, so a scheduled refit never needs to query again.
    """

    def __init__(self, default: Innovations, history: int = 360, capacity: int = 16,
                 sigma_halflife: float = 60.0, max_gap_steps: int = 12):
        self.default = default
        self.history = int(history)
        self.max_gap = int(max_gap_steps)
        # Online residual variance: an EWMA, so sigma tracks regime changes between refits.
        self.lam = 1.0 - 0.5 ** (1.0 / sigma_halflife)
        self.cap = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._spec = {
            "alpha": default.alpha, "beta": default.beta, "d": default.d, "phi": default.phi,
            "c": default.c, "level": np.nan, "slope": 0.0, "sigma2": np.nan, "nobs": 0,
            "gap": 0, "fitted_at": -np.inf, "sigma2_fit": np.nan, "zbias": 0.0, "zvar": 1.0,
            "model": -1, "hpos": 0, "hlen": 0,
        }
        self.hist = np.full((0, self.history), np.nan)
        self.grow(capacity)

    # The per-row arrays read as attributes (``bank.level[rows]``, ``bank.nobs[rows]``).
    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("_arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def grow(self, cap: int) -> None:
        if cap <= self.cap:
            return
        for k, fill in self._spec.items():
            dtype = np.int64 if k in ("nobs", "gap", "model", "hpos", "hlen") else float
            new = np.full(cap, fill, dtype=dtype)
            if k in self._arrays:
                new[: self.cap] = self._arrays[k]
            self._arrays[k] = new
        hist = np.full((cap, self.history), np.nan)
        hist[: self.cap] = self.hist
        self.hist = hist
        self.cap = cap

    def reset(self, rows: np.ndarray, keep_params: bool = True) -> None:
        """Forget state (a restart: the series starts over). Fitted parameters stay if asked."""
        for k in ("level", "slope", "sigma2", "nobs", "gap", "zbias", "zvar", "hpos", "hlen"):
            self._arrays[k][rows] = self._spec[k]
        self.hist[rows] = np.nan
        if not keep_params:
            for k in ("alpha", "beta", "d", "phi", "c", "fitted_at", "sigma2_fit", "model"):
                self._arrays[k][rows] = self._spec[k]

    def set_model(self, row: int, p: Innovations, level: float, slope: float, sigma2: float,
                  model: int, fitted_at: float) -> None:
        a = self._arrays
        a["alpha"][row], a["beta"][row], a["d"][row], a["phi"][row], a["c"][row] = (
            p.alpha, p.beta, p.d, p.phi, p.c)
        a["level"][row], a["slope"][row], a["sigma2"][row] = level, slope, sigma2
        a["model"][row], a["fitted_at"][row], a["sigma2_fit"][row] = model, fitted_at, sigma2
        a["zbias"][row], a["zvar"][row] = 0.0, 1.0

    def surprise(self, rows: np.ndarray) -> np.ndarray:
        """How badly recent errors fit the model: |mean z| or RMS z, whichever is larger.

        z is the error over the sigma the model was fit with, so a slow drift (biased errors)
        or a noisier regime shows even after the online sigma has adapted to it. About 1 when
        the model still fits.
        """
        return np.maximum(3.0 * np.abs(self.zbias[rows]), np.sqrt(self.zvar[rows]))

    def set_default(self, p: Innovations, rows: np.ndarray) -> None:
        """New parameters for rows without a fitted model, and for rows created from now on."""
        for k in ("alpha", "beta", "d", "phi", "c"):
            self._spec[k] = getattr(p, k)
            self._arrays[k][rows] = getattr(p, k)
        self.default = p

    def params(self, row: int) -> Innovations:
        a = self._arrays
        return Innovations(float(a["alpha"][row]), float(a["beta"][row]), float(a["d"][row]),
                           float(a["phi"][row]), float(a["c"][row]))

    def recent(self, row: int) -> np.ndarray:
        """The row's kept observations, oldest first (NaN for gaps)."""
        n, p = int(self.hlen[row]), int(self.hpos[row])
        idx = (p - n + np.arange(n)) % self.history
        return self.hist[row, idx]

    def update(self, rows: np.ndarray, y: np.ndarray) -> None:
        """One step for ``rows``: observe ``y`` (NaN = gap), update state, sigma and history."""
        a = self._arrays
        y = np.asarray(y, dtype=float)
        ok = np.isfinite(y)
        ix = row_index(rows)  # reads are views where rows are one run; every write comes after them
        alpha, beta, d, phi, c = (a[k][ix] for k in ("alpha", "beta", "d", "phi", "c"))
        level, slope, sigma2 = a["level"][ix], a["slope"][ix], a["sigma2"][ix]
        nobs, gap = a["nobs"][ix], a["gap"][ix]
        # A long gap makes the old state meaningless: start again from the next observation.
        stale = gap > self.max_gap
        nobs = np.where(stale, 0, nobs)
        first = ok & (nobs == 0)
        yhat = level + d * slope
        e = np.where(ok & ~first, y - yhat, 0.0)
        new_level = np.where(first, y, yhat + alpha * e)
        with np.errstate(divide="ignore", invalid="ignore"):
            start_slope = np.where((phi < 1.0) & (c != 0.0), c / (1.0 - phi), 0.0)
        new_slope = np.where(first, start_slope, c + phi * slope + beta * e)
        keep = ~ok & (nobs == 0)  # nothing known yet: stay unset
        a["level"][rows] = np.where(keep, np.nan, new_level)
        a["slope"][rows] = np.where(keep, 0.0, new_slope)
        learn = ok & ~first
        n_err = nobs  # errors seen before this one (the first observation has none)
        # Until enough errors exist the variance is their plain mean; then an EWMA.
        w = np.where(n_err < 1.0 / self.lam, 1.0 / np.maximum(n_err, 1), self.lam)
        prev = np.where(np.isfinite(sigma2), sigma2, 0.0)
        new_sigma2 = np.where(learn, (1 - w) * prev + w * e * e, sigma2)
        ref = a["sigma2_fit"][rows]
        ref = np.where(np.isfinite(ref), ref, prev)  # before any fit: the running estimate
        with np.errstate(divide="ignore", invalid="ignore"):
            # Against a zero-variance fit (a constant series) any error is as surprising as it gets.
            z = np.where(ref > 0, e / np.sqrt(ref), np.sign(e) * 10.0)
        z = np.where(learn, np.clip(z, -10.0, 10.0), 0.0)
        a["zbias"][rows] = np.where(learn, 0.9 * a["zbias"][rows] + 0.1 * z, a["zbias"][rows])
        a["zvar"][rows] = np.where(learn, 0.9 * a["zvar"][rows] + 0.1 * z * z, a["zvar"][rows])
        a["sigma2"][rows] = new_sigma2
        a["nobs"][rows] = nobs + ok
        a["gap"][rows] = np.where(ok, 0, gap + 1)
        p = a["hpos"][ix]
        p0 = shared_position(p)
        if p0 is not None and isinstance(ix, slice):  # every row at the same slot: one column
            self.hist[ix, p0] = y
            a["hpos"][ix] = (p0 + 1) % self.history
        else:
            self.hist[rows, p] = y
            a["hpos"][rows] = (p + 1) % self.history
        a["hlen"][rows] = np.minimum(a["hlen"][ix] + 1, self.history)

    def last_points(self, rows: np.ndarray, back: np.ndarray) -> np.ndarray:
        """(rows, len(back)): each row's observation ``back`` steps before its newest (0: the
        newest), NaN for gaps; slots never written hold NaN too (compare ``back`` with hlen)."""
        ix = row_index(rows)
        p = self.hpos[ix]
        p0 = shared_position(p)
        if p0 is not None and isinstance(ix, slice):
            return self.hist[ix][:, (p0 - 1 - back) % self.history]
        idx = (p[:, None] - 1 - back[None, :]) % self.history
        return self.hist[rows[:, None], idx]

    def forecast(self, rows: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        a = self._arrays
        return forecast_moments(a["level"][rows], a["slope"][rows], a["sigma2"][rows],
                                a["alpha"][rows], a["beta"][rows], a["d"][rows], a["phi"][rows],
                                a["c"][rows], steps)
