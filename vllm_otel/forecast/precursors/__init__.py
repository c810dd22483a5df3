"""Precursor models: each turns a pattern that comes before one failure into a probability.

The detector (:mod:`~vllm_otel.forecast.detector`) steps them all and publishes, per failure, the
highest of its estimates. One module each, with the per-row state it keeps:

- :mod:`.stall`: engine stalls, from flat spells (tokens flat while requests are present) and
  how long spells have lasted, fleet-wide;
- :mod:`.load_trend`: a damped line through the recent KV usage / waiting requests, with the
  noise around it learned (KV-cache exhaustion, queue overload);
- :mod:`.offered_load`: arrivals against the capacity measured by Little's law (queue overload);
- :mod:`.preemption`: what of a preemption window stays in it, plus bursts at the recent rate
  (preemption storm);
- :mod:`.memory`: a steady straight climb of memory (memory exhaustion).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PRECURSORS", "first_time"]

# precursor pattern -> the failures it points to
PRECURSORS: dict[str, tuple[str, ...]] = {
    "kv_rising_with_preemptions": ("kv_cache_exhaustion", "preemption_storm"),
    "memory_steady_slope": ("memory_exhaustion",),
    "tokens_flat_while_running": ("engine_stall",),
    "kv_usage_rising": ("kv_cache_exhaustion",),
    "waiting_rising": ("queue_overload",),
    "arrivals_over_capacity": ("queue_overload",),
}


def first_time(reached: np.ndarray, dt: float) -> np.ndarray:
    """(n, H) bool, True from where the failure is more likely than not -> the time of the first
    True column ((column + 1) x ``dt``), NaN in rows without one."""
    return np.where(reached.any(axis=1), (np.argmax(reached, axis=1) + 1) * dt, np.nan)
