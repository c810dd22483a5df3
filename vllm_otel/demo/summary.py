"""Did the loop close? Each step's time, read from the services after the run.

* predicted: the first scrape at which the *live* forecaster's probability of a failure type the
  policy acts on reached the threshold (Prometheus' record of ``vllm_otel_failure_probability``).
* failure: the first step at which that failure really happened, by the forecaster's own failure
  definitions applied to the vLLM series Prometheus scraped (:func:`vllm_otel.forecast.backtest.replay`);
  none during the ramp means it was prevented.
* alert received, action started, verified: the receiver's audit trail (``GET /actions``).
* learner: the first poll at which the receiver's ``GET /learner`` counted that strategy's outcome.
* stall: the SIGSTOP, the watchdog's ``vllm_otel_engine_stalled``, the restart action, and the
  first request answered by the new server.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["action_time", "is_predictive", "learner_attempts", "first_crossing", "failure_onsets",
           "closed_loop", "PREDICTIVE_ALERTS", "THRESHOLD"]

PREDICTIVE_ALERTS = ("VllmOtelFailurePredicted", "VllmOtelFailureImminent")
THRESHOLD = 0.7


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def action_time(action: Mapping[str, Any], key: str) -> float | None:
    """A time of an audit-trail entry: ``received_at`` / ``starts_at`` / ``resolved_at`` of its
    alert, or ``started_at`` / ``finished_at`` / ``created_at`` of the action (unix seconds)."""
    if key in ("received_at", "starts_at", "resolved_at"):
        return _ts((action.get("alert") or {}).get(key))
    return _ts((action.get("timings") or {}).get(key))


def is_predictive(action: Mapping[str, Any]) -> bool:
    return (action.get("alert") or {}).get("alertname") in PREDICTIVE_ALERTS


def learner_attempts(learner: Any, strategy: str) -> int:
    """How many outcomes of ``strategy`` the learner's ``GET /learner`` answer counts, whatever
    its layout (every mapping naming the strategy with an ``attempts`` count is summed)."""
    total = 0
    stack: list[Any] = [learner]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if node.get("strategy") == strategy and isinstance(node.get("attempts"), (int, float)):
                total += int(node["attempts"])
                continue
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return total


def first_crossing(points: Iterable[tuple[float, float]], threshold: float, since: float,
                   until: float | None = None) -> tuple[float, float] | None:
    """The first (t, value) at or above ``threshold`` within [since, until]."""
    for t, v in points:
        if t >= since and (until is None or t <= until) and v >= threshold:
            return t, v
    return None


def failure_onsets(series_json: Mapping[str, Any], *, horizon_s: float, min_history_s: float,
                   failure_types: Iterable[str], catalog: Mapping[str, Any] | None = None) -> dict[str, list[float]]:
    """Times at which each failure type began, by the forecaster's definitions (``catalog``: the
    thresholds the live forecaster was given) applied to the scraped vLLM series (a replay of the
    detector over the run; only its labels are used)."""
    from vllm_otel.forecast.backtest import replay
    from vllm_otel.forecast.detector_config import DetectorConfig
    from vllm_otel.forecast.promjson import parse_query_range

    frame = parse_query_range(series_json, step=1.0)
    if not frame.units or len(frame.t) < 2:
        return {}
    result = replay(frame, DetectorConfig(step_s=1.0, horizon_s=horizon_s, min_history_s=min_history_s,
                                          max_refits_per_step=0, catalog=dict(catalog or {})))
    wanted = set(failure_types)
    out: dict[str, list[float]] = {}
    for j, f in enumerate(result.failure_types):
        if f not in wanted:
            continue
        lab = result.labels[:, :, j].any(axis=0)
        starts = np.flatnonzero(lab & ~np.concatenate([[False], lab[:-1]]))
        out[f] = [float(result.t[k]) for k in starts]
    return out


STEPS = ("predicted", "alert_received", "action_started", "verified", "learner_recorded",
         "served_throughout", "stall_detected", "restarted", "serving_again")


def closed_loop(steps: Mapping[str, Any], *, stall: bool) -> tuple[bool, str | None]:
    """(closed, the first step that did not happen, as one line)."""
    why = {
        "predicted": "no failure was predicted before it happened",
        "alert_received": "no predictive alert reached the receiver",
        "action_started": "the receiver started no mitigation for the predicted failure",
        "verified": "the mitigation did not verify as a success",
        "learner_recorded": "the mitigation's outcome did not reach the learner",
        "served_throughout": "vLLM did not answer requests throughout (outside the induced stall)",
        "stall_detected": "the frozen engine was not detected as stalled",
        "restarted": "the stalled engine was not restarted",
        "serving_again": "vLLM did not serve again after the restart",
    }
    for name in STEPS:
        if not stall and name in ("stall_detected", "restarted", "serving_again"):
            continue
        if not steps.get(name):
            return False, why[name]
    return True, None
