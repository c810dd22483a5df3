"""Rules mined from the outcome history, and a learner that follows them.

A rule says, for a failure type and optionally one more condition of the situation (severity,
lifecycle state, a metric bucket, or the whole situation), how often a strategy succeeded:
"for queue_overload at kv_cache_usage >= 0.9, lower_queue_limits succeeded 41 of 45 times (91 %)".
Support is the number of executed outcomes behind it, confidence the share that succeeded. A
narrower rule is only kept when it says something its failure type's rule does not (its success
rate differs by at least ``min_lift``): otherwise every bucket would repeat the same line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_otel.learn.bandits import ContextualLearner
from vllm_otel.learn.context import Context
from vllm_otel.learn.evidence import Evidence

__all__ = ["Rule", "extract_rules", "RulesLearner"]


@dataclass(frozen=True)
class Rule:
    failure_type: str
    conditions: tuple[str, ...]
    strategy: str
    support: int
    successes: int

    @property
    def confidence(self) -> float:
        return self.successes / self.support if self.support else 0.0

    def matches(self, ctx: Context) -> bool:
        return ctx[0] == self.failure_type and set(self.conditions) <= set(ctx[1:])

    @property
    def text(self) -> str:
        where = self.failure_type + (f" at {', '.join(self.conditions)}" if self.conditions else "")
        return (f"for {where}, {self.strategy} succeeded {self.successes} of {self.support} times "
                f"({self.confidence:.0%})")

    def to_json(self) -> dict[str, Any]:
        return {"failure_type": self.failure_type, "conditions": list(self.conditions),
                "strategy": self.strategy, "support": self.support, "successes": self.successes,
                "confidence": round(self.confidence, 4), "text": self.text}


def extract_rules(evidence: Evidence, *, min_support: int = 5, min_lift: float = 0.15) -> list[Rule]:
    """Rules with at least ``min_support`` outcomes, most supported first per failure type."""
    tallies: dict[tuple[str, tuple[str, ...], str], list[int]] = {}
    for ctx, arms in evidence.contexts.items():
        conds = {()} | {(p,) for p in ctx[1:]}
        if len(ctx) > 2:
            conds.add(tuple(ctx[1:]))
        for s, arm in arms.items():
            for c in conds:
                t = tallies.setdefault((ctx[0], c, s), [0, 0])
                t[0] += arm.attempts
                t[1] += arm.successes
    rules = []
    for (fam, conds, s), (n, k) in tallies.items():
        if n < min_support:
            continue
        # A narrower rule must say something each broader one does not.
        broader = [()] + ([(c,) for c in conds] if len(conds) > 1 else []) if conds else []
        if any(abs(k / n - tallies[(fam, b, s)][1] / tallies[(fam, b, s)][0]) < min_lift
               for b in broader):
            continue
        rules.append(Rule(fam, conds, s, n, k))
    return sorted(rules, key=lambda r: (r.failure_type, len(r.conditions), -r.support, r.strategy,
                                        r.conditions))


class RulesLearner(ContextualLearner):
    """Runs the strategy whose most specific supported rule promises the best reward (success
    rate minus cost); without a rule, its smoothed record in this situation stands in."""

    kind = "rules"

    def _choose(self, ctx: Context, names: list[str]) -> tuple[str, str]:
        rules = [r for r in extract_rules(self.evidence, min_support=self.config.min_support,
                                          min_lift=0.0) if r.matches(ctx) and r.strategy in names]
        best, best_score, best_why = names[0], float("-inf"), ""
        for n in names:
            mine = [r for r in rules if r.strategy == n]
            if mine:
                r = max(mine, key=lambda r: (len(r.conditions), r.support))
                p, why = (r.successes + 1) / (r.support + 2), r.text
            else:
                a, b = self.posterior(ctx, n)
                p, why = a / (a + b), f"{n}: no rule yet (success {a / (a + b):.2f} so far)"
            score = p - self.cost(ctx, n)
            if score > best_score:
                best, best_score, best_why = n, score, why
        return best, f"best rule: {best_why}"
