"""Memory exhaustion: the "memory steady slope" precursor and what it implies.

A leak shows as a straight climb: least squares over the recent memory points with a positive
slope and R^2 above the bar. Where it holds, the regression's own prediction interval at the
horizon gives P(limit reached), and the crossing point a time to failure. No state of its own:
it reads the memory signal's history in the forecast bank.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from vllm_otel.forecast.statespace import InnovationsBank

__all__ = ["MemoryTrend"]


class MemoryTrend:
    """The steady-slope regression over the last ``points`` memory observations."""

    def __init__(self, points: int, r2: float, horizon_steps: int, step_s: float):
        self.points = points
        self.r2 = r2
        self.horizon_steps = horizon_steps
        self.step_s = step_s

    def probability(self, rows: np.ndarray, bank: InnovationsBank | None, full: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(active, probability, time to failure in seconds), NaN where not active.
        ``full=False``: the precursor alone, as ingesting history needs; the rest stays NaN."""
        n = len(rows)
        nan = np.full(n, np.nan)
        if bank is None:
            return np.zeros(n, dtype=bool), nan, nan
        H = self.horizon_steps
        if not (bank.hlen[rows] > 0).any():
            return np.zeros(n, dtype=bool), nan, nan  # no memory data at all (vLLM series only)
        # Only the last N points of each ring: gather them rather than scanning the whole ring.
        back = np.arange(min(self.points, bank.history))
        y = bank.last_points(rows, back)
        use = (back[None, :] < bank.hlen[rows][:, None]) & np.isfinite(y)
        with np.errstate(invalid="ignore", divide="ignore"):
            if use.all():
                # Every row has every point (the usual case): x, its mean and spread are the same
                # for all rows, computed once; the same sums as below, so the same numbers.
                x1 = -back.astype(float)                      # steps relative to now
                m = np.full(n, float(len(back)))
                xm1 = x1.sum() / float(len(back))
                dx1 = x1 - xm1
                xm = np.full(n, xm1)
                ym = y.sum(axis=1) / m
                dy = y - ym[:, None]
                sxx = np.full(n, (dx1 * dx1).sum())
                syy, sxy = (dy * dy).sum(axis=1), (dx1[None, :] * dy).sum(axis=1)
            else:
                x = -np.broadcast_to(back, y.shape).astype(float)  # steps relative to now
                m = use.sum(axis=1).astype(float)
                xm = np.where(use, x, 0).sum(axis=1) / m
                ym = np.where(use, y, 0).sum(axis=1) / m
                dx, dy = np.where(use, x - xm[:, None], 0), np.where(use, y - ym[:, None], 0)
                sxx, syy, sxy = (dx * dx).sum(axis=1), (dy * dy).sum(axis=1), (dx * dy).sum(axis=1)
            slope = sxy / sxx
            r2 = sxy * sxy / (sxx * syy)
            active = (m >= 10) & (sxy > 0) & (r2 >= self.r2)
            if not full:
                return active, nan, nan
            s2 = np.maximum(syy - slope * sxy, 0.0) / np.maximum(m - 2, 1)
            pred = ym + slope * (H - xm)
            se = np.sqrt(s2 * (1 + 1 / m + (H - xm) ** 2 / sxx))
            prob = ndtr((pred - 1.0) / np.maximum(se, 1e-12))  # memory_fraction's limit is 1
            steps = np.ceil((1.0 - ym) / slope + xm)
            ttf = np.where((steps >= 1) & (steps <= H), steps * self.step_s, np.nan)
        return active, np.where(active, prob, np.nan), np.where(active, ttf, np.nan)
