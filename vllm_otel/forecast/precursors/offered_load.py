"""Offered load against capacity: P(queue overload within the horizon), a leading signal.

Arrivals = requests finished + the growth of running + waiting over a short window; the service
time per running request = mean running / finish rate (Little's law), learned from the
instance's own history; capacity = running-request limit / service time. The coming arrival rate
is predicted from the measured one by a regression learned per instance, so a short burst at a
steady load is not taken to last while a rise that has gone on is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
from scipy.special import ndtr

from vllm_otel.forecast.failures import FailureCatalog

if TYPE_CHECKING:
    from vllm_otel.forecast.detector_config import DetectorConfig

__all__ = ["OfferedLoad"]


class OfferedLoad:
    """Per row: a ring of cumulative arrivals, decayed sums for the service time and for the
    regression of the coming arrival rate on the measured one."""

    def __init__(self, config: "DetectorConfig", catalog: FailureCatalog):
        cfg = self.config = config
        self.catalog = catalog
        self.window_steps = max(2, int(round(cfg.arrival_window_s / cfg.step_s)))
        self.persist_steps = max(1, int(round(cfg.arrival_persist_s / cfg.step_s)))
        self.ring_len = self.window_steps + self.persist_steps + 1
        self.decay = 0.5 ** (cfg.step_s / cfg.capacity_halflife_s)
        self.arrivals = np.full((0, self.ring_len), np.nan)  # finished so far + running + waiting
        self.pos = np.zeros(0, dtype=np.int64)
        self.occupancy = np.zeros(0)     # running + waiting now
        self.finished = np.zeros(0)      # finished so far
        self.busy = np.zeros(0)          # decayed sum of running x step (request-seconds in service)
        self.done = np.zeros(0)          # decayed count of finished requests
        # decayed regression sums: x = arrival rate measured then, y = the rate over the
        # arrival_persist_s that followed; columns n, x, y, xx, xy, yy
        self.reg = np.zeros((0, 6))

    def grow(self, cap: int) -> None:
        old = len(self.pos)
        new = np.full((cap, self.ring_len), np.nan)
        new[:old] = self.arrivals
        self.arrivals = new
        reg = np.zeros((cap, 6))
        reg[:old] = self.reg
        self.reg = reg
        for name in ("pos", "occupancy", "finished", "busy", "done"):
            old_a = getattr(self, name)
            grown = np.zeros(cap, dtype=old_a.dtype)
            grown[:old] = old_a
            setattr(self, name, grown)

    def reset(self, rows: np.ndarray) -> None:
        """Forget rows' history (a restart, or a row released)."""
        self.arrivals[rows] = np.nan
        for a in (self.pos, self.occupancy, self.finished, self.busy, self.done, self.reg):
            a[rows] = 0

    def observe(self, rows: np.ndarray, sig: Mapping[str, np.ndarray], moving: np.ndarray) -> None:
        """Push this step's occupancy (running + waiting) and cumulative finished count into the
        arrival rings, and learn the service time from steps where the engine was ``moving``.

        A step with unknown data, or inside a flat spell (a frozen engine freezes its gauges and
        counters; the backlog released after it is no arrival rate either), is stored as NaN,
        so no arrival rate is measured across it, and it teaches nothing about service time.
        """
        running, waiting, fin = sig["running"], sig["waiting"], sig["finished"]
        ok = np.isfinite(running) & np.isfinite(waiting) & np.isfinite(fin) & moving
        self.finished[rows] += np.where(np.isfinite(fin), fin, 0.0)
        pos = self.pos[rows]
        self.occupancy[rows] = np.where(ok, running + waiting, np.nan)
        self.arrivals[rows, pos] = np.where(ok, self.finished[rows] + running + waiting, np.nan)
        self.pos[rows] = (pos + 1) % self.ring_len
        d = self.decay
        # How well did the arrival rate measured arrival_persist_s ago predict the rate since?
        # (A burst that does not last, or a rise that goes on, both show here.)
        step, Wa, P = self.config.step_s, self.window_steps, self.persist_steps
        now = self.arrivals[rows, pos]
        then = self.arrivals[rows, (pos - P) % self.ring_len]
        before = self.arrivals[rows, (pos - P - Wa) % self.ring_len]
        with np.errstate(invalid="ignore"):
            x = (then - before) / (Wa * step)
            y = (now - then) / (P * step)
        known = np.isfinite(x) & np.isfinite(y)
        x, y = np.nan_to_num(x), np.nan_to_num(y)
        terms = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
        self.reg[rows] = np.where(known[:, None], d * self.reg[rows] + terms, self.reg[rows])
        self.busy[rows] = np.where(ok, d * self.busy[rows] + running * self.config.step_s, self.busy[rows])
        self.done[rows] = np.where(ok, d * self.done[rows] + fin, self.done[rows])

    def coming_rate(self, rows: np.ndarray, measured: np.ndarray, window: float
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, its variance) of the arrival rate over the coming ``arrival_persist_s``,
        from the rate ``measured`` over the last ``window`` seconds.

        The regression learned from this instance's history: a short burst at a steady load does
        not last (slope ~0, the prediction stays near the usual rate), a rise that has gone on
        does (slope ~1).
        """
        rn, rx, ry, rxx, rxy, ryy = (self.reg[rows, i] for i in range(6))
        xm, ym = rx / rn, ry / rn
        vx = np.maximum(rxx / rn - xm * xm, 1e-12)
        cxy = rxy / rn - xm * ym
        vy = np.maximum(ryy / rn - ym * ym, 0.0)
        beta = cxy / vx
        resid = np.maximum(vy - beta * cxy, 0.0) * rn / np.maximum(rn - 2.0, 1.0)
        pred = ym + beta * (measured - xm)
        var_pred = resid * (1.0 + 1.0 / rn + (measured - xm) ** 2 / (rn * vx))
        return pred, var_pred

    def probability(self, rows: np.ndarray, sig: Mapping[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(queue overload within the horizon) from offered load against learned capacity.

        With the predicted arrival rate held (no trend: a rise may stop), the fluid queue fills
        the running set (occupancy approaches arrivals x service time) and, when arrivals exceed
        capacity, grows at their difference; the overload threshold is reached after

            t1 = W ln((lam W - L0) / (lam W - limit))   (only while L0 < limit)
            t2 = (limit + threshold - max(L0, limit)) / (lam - mu)

        and never when lam <= mu. The rate's uncertainty (the regression's, plus the service
        time's, from the finished count it rests on) makes it a probability. Returns (arrivals
        over capacity, probability, time to failure), NaN where too little data (no full window
        since the last gap or frozen spell, too few finished requests, or an unknown
        running-request limit).
        """
        cfg = self.config
        n = len(rows)
        nan = np.full(n, np.nan)
        pos = self.pos[rows]
        back = (pos[:, None] - 1 - np.arange(self.window_steps + 1)[None, :]) % self.ring_len
        recent = self.arrivals[rows[:, None], back]          # newest first, arrival window + 1
        complete = np.isfinite(recent).all(axis=1)
        occ_now = self.occupancy[rows]
        window = self.window_steps * cfg.step_s
        q = self.catalog.queue_overload
        limit = (np.full(n, float(q.running_limit)) if q.running_limit is not None
                 else np.asarray(sig["running_limit"], dtype=float))
        thr = np.asarray(self.catalog.threshold("queue_overload", sig), dtype=float)
        H = cfg.horizon_s
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            lam = np.maximum((recent[:, 0] - recent[:, -1]) / window, 0.0)
            n_fin = self.done[rows]
            W = self.busy[rows] / n_fin
            mu = limit / W
            rn = self.reg[rows, 0]
            pred, var_pred = self.coming_rate(rows, lam, window)
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
              & np.isfinite(limit) & np.isfinite(thr) & np.isfinite(lam) & (limit > 0))
        prob, ttf = np.where(ok, prob, nan), np.where(ok, ttf, nan)
        return ok & (pred > mu), prob, ttf
