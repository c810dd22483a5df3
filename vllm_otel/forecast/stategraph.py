"""A health-state graph learned from history: where an instance is now, where it tends to go next.

Each step every instance is put in one state: a failure (by priority), a precursor (KV high while
preempting, tokens flat for k steps while requests are present, memory climbing...), or a normal
state (serving, queueing, idle). Transitions are counted over the whole fleet and turned into
probabilities with a Dirichlet prior, so nothing about "what follows what" is hard-coded: the
prior only says states tend to persist, and that a flat token count tends to stay flat (the one
structural belief, configurable, which history overrides within a few dozen observations).

From the transition matrix, the probability of reaching failure F within h steps from each state
is the absorbing-chain probability (F made absorbing), computed for h = 1..H by repeated
matrix-vector products; a state's time to failure is the first h where it reaches 1/2.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vllm_otel.forecast.failures import FAILURE_TYPES

__all__ = ["GraphPrior", "StateGraph", "BASE_STATES", "FAILURE_PRIORITY", "PRECURSOR_TARGETS", "state_names",
           "classify"]

BASE_STATES: tuple[str, ...] = (
    "no_data", "idle", "serving", "queueing", "kv_high", "kv_rising_with_preemptions",
    "memory_steady_slope", "thermal_high", "ecc_corrected",
)
# When several failures happen at once the state is the first of these (the most severe).
FAILURE_PRIORITY: tuple[str, ...] = (
    "gpu_hardware", "engine_stall", "memory_exhaustion", "kv_cache_exhaustion", "preemption_storm",
    "queue_overload", "ttft_slo_breach", "gpu_thermal",
)


# precursor state -> the failures it is known to precede (domain knowledge, used as a prior only)
PRECURSOR_TARGETS: dict[str, tuple[str, ...]] = {
    "kv_high": ("kv_cache_exhaustion",),
    "kv_rising_with_preemptions": ("kv_cache_exhaustion", "preemption_storm"),
    "memory_steady_slope": ("memory_exhaustion",),
    "thermal_high": ("gpu_thermal",),
    "ecc_corrected": ("gpu_hardware",),
}


class GraphPrior(BaseModel):
    """Dirichlet pseudo-counts added to the observed transition counts."""

    model_config = ConfigDict(extra="forbid")

    stay: float = Field(20.0, ge=0.0, description="on staying in the same state")
    move: float = Field(0.05, gt=0.0, description="on each other transition")
    # A flat spell either goes on (one more flat step) or ends (back to serving). 10:1 means that,
    # with no history, two flat scrapes in a row point to a stall (about 0.77 within the horizon,
    # counting the prior's slow leakage through other states) and a single one does not (0.66).
    stall_continue: float = Field(10.0, ge=0.0)
    stall_break: float = Field(1.0, ge=0.0)
    # A precursor pattern is, by definition, something that comes before its failure: one
    # pseudo-count on that transition (against ``stay`` on persisting) until history speaks.
    precursor: float = Field(1.0, ge=0.0)


def state_names(stall_steps: int) -> tuple[str, ...]:
    """All states for a given number of flat steps that make a stall."""
    flat = tuple(f"tokens_flat_{k}" for k in range(1, max(stall_steps, 1)))
    return BASE_STATES + flat + FAILURE_TYPES


def classify(names: tuple[str, ...], signals: Mapping[str, np.ndarray], breached: Mapping[str, np.ndarray],
             precursors: Mapping[str, np.ndarray], step_s: float) -> np.ndarray:
    """One state index per row, first matching rule wins (failures, then precursors, then normal)."""
    index = {s: i for i, s in enumerate(names)}
    n = len(next(iter(signals.values())))
    state = np.full(n, -1, dtype=np.int64)

    def put(mask: np.ndarray, name: str) -> None:
        if name in index:
            state[(state < 0) & np.asarray(mask, dtype=bool)] = index[name]

    known = np.zeros(n, dtype=bool)
    for s in ("kv_usage", "running", "waiting", "flat_seconds"):
        known |= np.isfinite(signals[s])
    put(~known, "no_data")
    for f in FAILURE_PRIORITY:
        if f in breached:
            put(breached[f], f)
    flat = signals["flat_seconds"]
    with np.errstate(invalid="ignore"):
        steps = np.where(np.isfinite(flat), np.floor(flat / step_s + 1e-6), 0).astype(np.int64)
    n_flat = sum(1 for s in names if s.startswith("tokens_flat_"))
    for k in range(n_flat, 0, -1):
        put(steps >= k if k == n_flat else steps == k, f"tokens_flat_{k}")
    for p in ("kv_rising_with_preemptions", "memory_steady_slope", "thermal_high", "kv_high",
              "ecc_corrected"):
        if p in precursors:
            put(precursors[p], p)
    with np.errstate(invalid="ignore"):
        put(signals["waiting"] > 0, "queueing")
        put(signals["running"] > 0, "serving")
    put(np.ones(n, dtype=bool), "idle")
    return state


class StateGraph:
    """Fleet-wide transition counts over health states, with reach probabilities per failure."""

    def __init__(self, names: tuple[str, ...], horizon_steps: int, prior: GraphPrior | None = None):
        self.names = names
        self.index = {s: i for i, s in enumerate(names)}
        self.horizon = max(int(horizon_steps), 1)
        self.prior = prior or GraphPrior()
        n = len(names)
        self.counts = np.zeros((n, n))
        self._prior = self._prior_matrix()
        self._reach: np.ndarray | None = None  # (F, S, H)
        self.failures = tuple(f for f in FAILURE_TYPES if f in self.index)

    def _prior_matrix(self) -> np.ndarray:
        n, p = len(self.names), self.prior
        m = np.full((n, n), p.move)
        np.fill_diagonal(m, p.stay)
        flat = [s for s in self.names if s.startswith("tokens_flat_")]
        serving = self.index.get("serving")
        for k, s in enumerate(flat, start=1):
            i = self.index[s]
            nxt = self.index[f"tokens_flat_{k + 1}"] if k < len(flat) else self.index["engine_stall"]
            m[i, i] = p.move  # a flat spell cannot stay at k steps: it grows or ends
            m[i, nxt] += p.stall_continue
            if serving is not None:
                m[i, serving] += p.stall_break
        for pre, targets in PRECURSOR_TARGETS.items():
            if pre in self.index:
                for f in targets:
                    if f in self.index:
                        m[self.index[pre], self.index[f]] += p.precursor
        return m

    def observe(self, prev: np.ndarray, cur: np.ndarray) -> None:
        """Count transitions prev -> cur (rows with a -1 on either side are skipped)."""
        ok = (prev >= 0) & (cur >= 0)
        if ok.any():
            np.add.at(self.counts, (prev[ok], cur[ok]), 1.0)
            self._reach = None

    def transition_matrix(self) -> np.ndarray:
        m = self.counts + self._prior
        return m / m.sum(axis=1, keepdims=True)

    def reach(self) -> np.ndarray:
        """P(failure f reached within h steps | state s), shape (F, S, H); cached until new counts."""
        if self._reach is None:
            q = self.transition_matrix()
            out = np.empty((len(self.failures), len(self.names), self.horizon))
            for fi, f in enumerate(self.failures):
                j = self.index[f]
                qf = q.copy()
                qf[j] = 0.0
                qf[j, j] = 1.0
                v = np.zeros(len(self.names))
                v[j] = 1.0
                for h in range(self.horizon):
                    v = qf @ v
                    out[fi, :, h] = v
            self._reach = out
        return self._reach

    def predict(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probability of each failure within the horizon and steps to reach 1/2 (NaN: not within).

        Shapes (n, F). Rows in state -1 get NaN.
        """
        r = self.reach()
        valid = states >= 0
        s = np.where(valid, states, 0)
        per = r[:, s, :]                                  # (F, n, H)
        prob = per[:, :, -1].T.copy()
        crossed = per >= 0.5
        steps = np.where(crossed.any(axis=2), np.argmax(crossed, axis=2) + 1, np.nan).T
        prob[~valid] = np.nan
        steps[~valid] = np.nan
        return prob, steps

    # -- persistence (JSON-safe: the service keeps what it learned across restarts) ----------
    def to_dict(self) -> dict[str, Any]:
        return {"states": list(self.names),
                "counts": {a: {b: float(self.counts[i, j]) for j, b in enumerate(self.names)
                               if self.counts[i, j]} for i, a in enumerate(self.names)
                           if self.counts[i].any()}}

    def load_dict(self, data: Mapping[str, Any]) -> None:
        """Add counts saved by :meth:`to_dict`; states this graph does not have are ignored."""
        for a, row in (data.get("counts") or {}).items():
            for b, c in row.items():
                if a in self.index and b in self.index:
                    self.counts[self.index[a], self.index[b]] += float(c)
        self._reach = None
