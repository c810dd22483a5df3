"""Engine stalls: a direct rule on flat spells, with its probabilities learned fleet-wide.

A flat spell is a run of steps with generation tokens flat while requests are present. The
model follows each instance's spell and counts how long spells last across the fleet: the
survival that says how likely a spell of ``k`` steps is to reach the stall definition. It also
keeps a ring of the recent spell lengths per row, which the load trend reads (a frozen engine
freezes its gauges: those samples say nothing about load).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EngineStall"]


class EngineStall:
    """Flat spells per row and, fleet-wide, how long they last."""

    def __init__(self, stall_steps: int, horizon_steps: int, step_s: float, ring_len: int,
                 prior_strength: float, base_prior_horizons: float):
        self.steps = stall_steps                       # flat steps that make a stall
        self.horizon_steps = horizon_steps
        self.step_s = step_s
        self.ring_len = ring_len
        self.prior_strength = prior_strength
        self.base_prior_horizons = base_prior_horizons
        self.flat_k = np.zeros(0, dtype=np.int64)      # length of each row's current spell
        self._broken = np.zeros(stall_steps + 1)       # flat spells that ended after k steps
        self._stalls = 0.0                             # spells that reached the stall definition
        self._flowing_steps = 0.0                      # instance-steps with tokens not flat
        # How long the flat spell had lasted at each recent step (0: tokens flowing). A ring per
        # row, pushed once per step like the banks' histories, so the two line up.
        self.ring = np.zeros((0, ring_len), dtype=np.int64)
        self.ring_pos = np.zeros(0, dtype=np.int64)

    def grow(self, cap: int) -> None:
        old = len(self.flat_k)
        ring = np.zeros((cap, self.ring_len), dtype=np.int64)
        ring[:old] = self.ring
        self.ring = ring
        for name in ("ring_pos", "flat_k"):
            new = np.zeros(cap, dtype=np.int64)
            new[:old] = getattr(self, name)
            setattr(self, name, new)

    def release(self, rows: np.ndarray) -> None:
        self.flat_k[rows] = 0
        self.ring[rows] = 0

    def observe(self, rows: np.ndarray, flat_seconds: np.ndarray) -> None:
        """Follow each row's flat spell and count, fleet-wide, how long spells last."""
        K, step = self.steps, self.step_s
        known = np.isfinite(flat_seconds)
        k_now = np.where(known, np.floor(np.nan_to_num(flat_seconds) / step + 1e-6), 0).astype(np.int64)
        prev = self.flat_k[rows]
        k_now = np.where(known, k_now, prev)  # unknown data: the spell neither grows nor ends
        broke = known & (prev > 0) & (prev < K) & (k_now < prev)
        if broke.any():
            np.add.at(self._broken, prev[broke], 1.0)
        self._stalls += float(((prev < K) & (k_now >= K)).sum())
        self._flowing_steps += float((known & (k_now == 0)).sum())
        self.flat_k[rows] = k_now
        pos = self.ring_pos[rows]
        self.ring[rows, pos] = k_now
        self.ring_pos[rows] = (pos + 1) % self.ring_len

    def last_slot(self, rows: np.ndarray) -> np.ndarray:
        """The ring slot :meth:`observe` filled last (rings of other models kept in step use it)."""
        return (self.ring_pos[rows] - 1) % self.ring_len

    def recent_slots(self, rows: np.ndarray, back: np.ndarray) -> np.ndarray:
        """(rows, len(back)) ring slots ``back`` steps before the newest."""
        return (self.ring_pos[rows, None] - 1 - back[None, :]) % self.ring_len

    def probability(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(a spell flat for ``k`` steps reaches the stall definition) and steps left.

        Beta-binomial on the spells seen: of those that lasted at least k steps, how many went
        on to a stall; prior mean k/K with ``prior_strength`` pseudo-spells. Not flat (k = 0):
        the learned rate of stall onsets per flowing instance-step (starting from
        ``base_prior_horizons`` horizons without a stall), over the horizon.
        """
        K, H = self.steps, self.horizon_steps
        reached_by_len = np.concatenate([np.cumsum(self._broken[::-1])[::-1], [0.0]])  # sum_{L>=k}
        kk = np.clip(k, 0, K)
        reached = self._stalls + reached_by_len[np.minimum(kk, K)]
        s = self.prior_strength
        flat_p = (self._stalls + s * kk / K) / (reached + s)
        rate = self._stalls / (self._flowing_steps + 1.0 + self.base_prior_horizons * H)
        base = 1.0 - (1.0 - rate) ** H
        prob = np.where(kk >= K, 1.0, np.where(kk > 0, flat_p, base))
        steps = np.where(kk > 0, np.maximum(K - kk, 0).astype(float), np.nan)
        return prob, steps
