"""The learner's situations (contexts) and the Beta distribution arithmetic it needs.

A context is a tuple of readable parts: the failure type (else the alert name) first, then the
severity, the lifecycle state and the metric buckets the policy asks for, e.g.
``("queue_overload", "critical", "serving", "kv_cache_usage >= 0.9")``. The first part alone is
the context's *family*: finer contexts borrow evidence from it while they have little of their own.

The Beta quantile is computed here (continued fraction + bisection) rather than with scipy, whose
import takes ~0.25 s of CPU while holding the GIL: the receiver's intake shares that process.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from vllm_otel.learn.config import ContextConfig

__all__ = ["context_of", "family_of", "describe_context", "beta_quantile", "lifecycle_of"]

Context = tuple[str, ...]


def family_of(state: Mapping[str, Any]) -> str:
    return str(state.get("failure_type") or state.get("alertname") or "unknown")


def lifecycle_of(state: Mapping[str, Any], metrics: Mapping[str, float]) -> str | None:
    """The target's lifecycle state: a label when the alert carries one, else from its metrics."""
    labels = state.get("labels") or {}
    for key in ("lifecycle_state", "state"):
        v = state.get(key) if key == "lifecycle_state" else labels.get(key)
        if isinstance(v, str) and v:
            return v.lower()
    if not metrics:
        return None
    if metrics.get("up", 1.0) < 1.0:
        return "down"
    for flag in ("stalled", "sleeping", "paused"):
        if metrics.get(flag, 0.0) >= 1.0:
            return flag
    return "serving"


def _bucket(name: str, value: float, cuts: list[float]) -> str:
    below = [c for c in cuts if value < c]
    if not below:
        return f"{name} >= {cuts[-1]:g}"
    hi = below[0]
    lower = [c for c in cuts if c <= value]
    return f"{lower[-1]:g} <= {name} < {hi:g}" if lower else f"{name} < {hi:g}"


def context_of(state: Mapping[str, Any], metrics: Mapping[str, float], cfg: ContextConfig) -> Context:
    parts = [family_of(state)]
    if cfg.severity:
        sev = state.get("severity") or (state.get("labels") or {}).get("severity")
        parts.append(str(sev or "no severity"))
    if cfg.lifecycle:
        life = lifecycle_of(state, metrics)
        if life is not None:
            parts.append(life)
    for name, cuts in cfg.metrics.items():
        v = metrics.get(name)
        if v is not None and math.isfinite(v):
            parts.append(_bucket(name, float(v), cuts))
    return tuple(parts)


def describe_context(ctx: Context) -> str:
    """``queue_overload at critical, serving, kv_cache_usage >= 0.9``."""
    return ctx[0] + (" at " + ", ".join(ctx[1:]) if len(ctx) > 1 else "")


# --- Beta distribution -----------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    # Lentz's continued fraction for the regularized incomplete beta function.
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-12:
            break
    return h


def _beta_cdf(x: float, a: float, b: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
          + b * math.log1p(-x))
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_quantile(q: float, a: float, b: float) -> float:
    """The ``q`` quantile of Beta(a, b), to 1e-6."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2.0
        if _beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0
