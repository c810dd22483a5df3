"""Load trend: P(a noisy load signal reaches its threshold within the horizon) from its recent trend.

For KV-cache usage (KV-cache exhaustion) and waiting requests (queue overload): a damped line
through block means of the recent window, extrapolated with its prediction interval, plus the
signal's own scrape-to-scrape noise around the line, whose tail is learned from the residuals
seen (load signals are heavy-tailed: a noisy signal touches the threshold before its mean does).
The line is fit only on data since the engine last moved and since the signal's failure last
ended: a frozen spell, or a failure and the rise that led to it, is a different regime.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np
from scipy.special import ndtr

from vllm_otel.forecast.precursors import first_time
from vllm_otel.forecast.precursors.stall import EngineStall
from vllm_otel.forecast.statespace import InnovationsBank

if TYPE_CHECKING:
    from vllm_otel.forecast.detector_config import DetectorConfig

__all__ = ["LoadTrend", "TREND_PRECURSORS"]

# load signal -> (its failure, the precursor its recent trend raises)
TREND_PRECURSORS: dict[str, tuple[str, str]] = {
    "kv_usage": ("kv_cache_exhaustion", "kv_usage_rising"),
    "waiting": ("queue_overload", "waiting_rising"),
}
# Gauss-Hermite nodes and weights (probabilists'), for integrating over a standard normal.
_GH = (lambda zw: (zw[0], zw[1] / zw[1].sum()))(np.polynomial.hermite_e.hermegauss(9))
# Bins of the learned residual tail (standardised residuals; beyond the last edge: the prior's).
_TAIL_EDGES = np.arange(-8.0, 12.0 + 1e-9, 0.25)


class LoadTrend:
    """The trend precursors of the load signals, with the residual tail learned per signal."""

    def __init__(self, config: "DetectorConfig", horizon_steps: int, stall: EngineStall):
        self.config = config
        self.horizon_steps = horizon_steps
        self.stall = stall
        self.ring_len = stall.ring_len
        self.freeze_steps = max(1, int(math.ceil(config.trend_freeze_s / config.step_s - 1e-9)))
        # Per trend signal: which recent steps had its failure under way (a ring kept in step
        # with the stall model's ring of flat spells).
        self._failed = {sig: np.zeros((0, self.ring_len), dtype=bool) for sig in TREND_PRECURSORS}
        # Per trend signal: counts of standardised residuals (newest sample minus the trend line,
        # over the window's noise) in the bins of _TAIL_EDGES, for the learned tail.
        self._tail_counts = {sig: np.zeros(len(_TAIL_EDGES) - 1) for sig in TREND_PRECURSORS}
        self._tail_sf: dict[str, np.ndarray] = {}

    def grow(self, cap: int) -> None:
        for sig, ring in self._failed.items():
            grown = np.zeros((cap, self.ring_len), dtype=bool)
            grown[: len(ring)] = ring
            self._failed[sig] = grown

    def release(self, rows: np.ndarray) -> None:
        for ring in self._failed.values():
            ring[rows] = False

    def record(self, rows: np.ndarray, breached: Mapping[str, np.ndarray]) -> None:
        """Note which rows are in each trend signal's failure now (after the stall model's step)."""
        last = self.stall.last_slot(rows)
        for s, ring in self._failed.items():
            f = TREND_PRECURSORS[s][0]
            ring[rows, last] = breached[f] if f in breached else False

    def probability(self, rows: np.ndarray, signal: str, bank: InnovationsBank, thr: np.ndarray
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
        cfg = self.config
        n = len(rows)
        B = max(1, int(round(cfg.trend_block_s / cfg.step_s)))
        nb = max(3, int(round(cfg.trend_window_s / cfg.step_s)) // B)
        N = nb * B
        Hb = max(1, int(math.ceil(self.horizon_steps / B)))
        back = np.arange(N)[::-1]                        # oldest first
        y = bank.last_points(rows, back)
        fidx = self.stall.recent_slots(rows, back)
        flat_k = self.stall.ring[rows[:, None], fidx]
        frozen = flat_k >= self.freeze_steps     # cuts the history before it
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
            p_blk = self.tail(signal, (thr[:, None, None] - level) / sd)
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
            # it agrees with the probability; the line's mean alone crosses later, if at all, as
            # the noise reaches the threshold first.
            ttf = first_time(p_by >= 0.5, B * cfg.step_s)
        ok = (m >= max(3, nb // 2)) & (sxx > 0) & np.isfinite(thr) & np.isfinite(prob) & (bank.gap[rows] <= 1)
        prob, ttf = np.where(ok, prob, np.nan), np.where(ok, ttf, np.nan)
        return ok & (slope > 0) & (prob >= 0.5), prob, ttf

    def tail(self, signal: str, k: np.ndarray) -> np.ndarray:
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
