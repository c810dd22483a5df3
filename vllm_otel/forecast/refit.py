"""Which series the detector refits with statsmodels each step, and the refits themselves.

Never-fit series first, then those whose errors show a regime change, then the stalest, capped
per step (and optionally by time): fitting is the only expensive part of a detector step.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from vllm_otel.forecast.detector_config import DetectorConfig
from vllm_otel.forecast.models import select_model
from vllm_otel.forecast.statespace import Innovations, InnovationsBank, filter_series

__all__ = ["RefitScheduler"]


class RefitScheduler:
    """Schedules and runs the refits of the detector's banks (one per forecast signal).

    ``fit_n[signal][row]`` is how many points a row's last full fit used: a series is refit as
    its history doubles (30, 60, 120... points), as well as when old or surprised.
    """

    def __init__(self, config: DetectorConfig, banks: Mapping[str, InnovationsBank],
                 model_names: list[str]) -> None:
        self.config = config
        self.banks = banks
        self.model_names = model_names
        self.fit_n = {s: np.zeros(0, dtype=np.int64) for s in banks}

    def grow(self, cap: int) -> None:
        for s, old in self.fit_n.items():
            fit_n = np.zeros(cap, dtype=np.int64)
            fit_n[: len(old)] = old
            self.fit_n[s] = fit_n

    def forget(self, rows: np.ndarray) -> None:
        """The rows' series start over: refit once they have enough points again."""
        for fit_n in self.fit_n.values():
            fit_n[rows] = 0

    def run(self, t: float, active: np.ndarray) -> int:
        """Refit the most deserving of the ``active`` rows' series, within this step's budget."""
        cfg = self.config
        if cfg.max_refits_per_step <= 0 or not len(active):
            return 0
        cands: list[tuple[tuple[float, float, float], str, int, bool]] = []
        for s, bank in self.banks.items():
            hlen = bank.hlen[active]
            fitted_at = bank.fitted_at[active]
            never = ~np.isfinite(fitted_at)
            grown = hlen >= 2 * self.fit_n[s][active]          # fit on 30, 60, 120... points
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
            self.fit_row(s, r, t, recent_only=regime)
            done += 1
        if done:
            self.pool_defaults(active)
        return done

    def pool_defaults(self, active: np.ndarray) -> None:
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

    def fit_row(self, s: str, row: int, t: float, recent_only: bool = False) -> None:
        bank = self.banks[s]
        y = bank.recent(row)
        if not recent_only:
            self.fit_n[s][row] = len(y)
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
        bank.set_model(row, p, level, slope, model.sigma2, self.model_names.index(model.name), t)
