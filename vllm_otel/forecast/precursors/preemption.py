"""Preemption storms: P(more than ``max_preemptions`` in some window ending within the horizon).

A storm is a count over a sliding window, so the count ahead is what of the window's past stays
in it (known exactly) plus new preemptions. Preemptions come in bursts (a scrape with several,
then quiet), so the new ones are bursts at the recent burst rate, uncertain as few bursts were
seen, each of the recent mean size; the recent past is weighted by age with
``preemption_rate_halflife_s``. The model keeps no state of its own: it reads the signal
extractor's ring of preemption increments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.special import betainc

from vllm_otel.forecast.failures import FailureCatalog
from vllm_otel.forecast.precursors import first_time
from vllm_otel.forecast.signals import SignalExtractor

if TYPE_CHECKING:
    from vllm_otel.forecast.detector_config import DetectorConfig

__all__ = ["PreemptionWindow"]


class PreemptionWindow:
    """The preemption window's own model of the count ahead."""

    def __init__(self, config: "DetectorConfig", catalog: FailureCatalog, horizon_steps: int):
        self.config = config
        self.catalog = catalog
        self.horizon_steps = horizon_steps

    def probability(self, rows: np.ndarray, t: float, extractor: SignalExtractor
                    ) -> tuple[np.ndarray, np.ndarray]:
        """P(a storm within the horizon), and the first time that is more likely than not; NaN
        where the window's data are not known. The path's probability is the largest over the
        horizon's steps (the counts ahead are strongly correlated, as for forecasts)."""
        cfg, cat = self.config, self.catalog.preemption_storm
        W, c, step, H = cat.window_s, cat.max_preemptions, cfg.step_s, self.horizon_steps
        ts, vals = extractor.preemption_increments(rows)
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
        ttf = first_time(p_h >= 0.5, step)
        # at least a third of the window scraped, and the newest scrape known
        ok = (inside.sum(axis=1) * step >= W / 3) & np.isfinite(vals[np.arange(n), np.argmax(ts, axis=1)])
        return np.where(ok, prob, np.nan), np.where(ok, ttf, np.nan)
