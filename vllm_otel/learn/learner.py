"""The learner's interface and its first, rule-based implementation.

The receiver asks a learner which of the strategies the policy allows to try
(:meth:`Learner.select_best_strategy`) and tells it every outcome (:meth:`Learner.record_outcome`).
Outcomes reach the learner from the store, in order, so a restarted receiver (or another replica)
replays the same history and learners stay storage-agnostic. Later learners (bandits, rules
mined from outcomes) implement the same protocol.

Nothing here imports the mitigation package: data flows mitigate -> learn, never back.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["Learner", "Candidate", "RuleBasedLearner", "EXECUTED", "FAILED", "candidate_name",
           "candidate_rank"]

# Outcome names (the mitigation receiver's vocabulary). Only actions that really ran teach us
# anything about a strategy; dry runs, blocks and skips do not.
EXECUTED: frozenset[str] = frozenset({"success", "failure", "no_effect", "interrupted"})
FAILED: frozenset[str] = frozenset({"failure", "no_effect", "interrupted"})


@runtime_checkable
class Candidate(Protocol):
    """A strategy as the learner sees it (strategy classes and instances qualify)."""

    name: str
    invasiveness: int


def candidate_name(c: Candidate | str) -> str:
    return c if isinstance(c, str) else c.name


def candidate_rank(c: Candidate | str) -> int:
    """Invasiveness; a bare name carries none, so it keeps its place in the given order."""
    return 0 if isinstance(c, str) else int(getattr(c, "invasiveness", 0))


@runtime_checkable
class Learner(Protocol):
    """Chooses a strategy for a situation and learns from what happened.

    ``state``: what the alert says (``alertname``, ``failure_type``, ``target``, ``severity``,
    labels). ``errors``: recent failures on that target, newest first. ``metrics``: current metric
    values of the target. ``available_strategies``: what the policy and the guards allow now, in
    policy order.
    """

    def select_best_strategy(self, state: Mapping[str, Any], errors: Sequence[str],
                             metrics: Mapping[str, float],
                             available_strategies: Sequence[Candidate | str]) -> tuple[str | None, float]:
        """The strategy to run (None: none is worth trying) and a confidence in 0..1."""
        ...

    def record_outcome(self, state: Mapping[str, Any], errors: Sequence[str],
                       metrics: Mapping[str, float], strategy: str | None, outcome: str, *,
                       metrics_after: Mapping[str, float] | None = None,
                       duration_s: float | None = None, at: float | None = None) -> None:
        """One outcome of ``strategy`` in that situation (every outcome, executed or not)."""
        ...


@dataclass
class _Tally:
    successes: int = 0
    attempts: int = 0

    @property
    def rate(self) -> float:
        # Laplace: an untried strategy is a coin flip, not a certainty either way.
        return (self.successes + 1) / (self.attempts + 2)


class RuleBasedLearner:
    """Least invasive first, skipping what failed recently.

    * candidates are ordered by ``invasiveness`` (stable: the policy's order breaks ties);
    * a strategy whose latest executed outcome on the same target, within ``failure_memory_s``,
      was a failure is skipped; a success later clears it;
    * when every candidate failed recently, nothing is chosen: the receiver escalates;
    * confidence is the strategy's smoothed success rate for this alert (or failure type).
    """

    kind = "rule_based"

    def __init__(self, *, failure_memory_s: float = 1800.0, history: int = 200,
                 clock: Callable[[], float] = time.time) -> None:
        self.failure_memory_s = failure_memory_s
        self.clock = clock
        # (strategy, target) -> recent executed outcomes, newest last
        self._recent: dict[tuple[str, str | None], deque[tuple[float, str]]] = defaultdict(
            lambda: deque(maxlen=history))
        # (strategy, situation) -> success tally
        self._tally: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
        self.last_reason = ""

    @staticmethod
    def _situation(state: Mapping[str, Any]) -> str:
        return str(state.get("failure_type") or state.get("alertname") or "")

    def failed_recently(self, strategy: str, target: str | None, now: float | None = None) -> bool:
        hist = self._recent.get((strategy, target))
        if not hist:
            return False
        at, outcome = hist[-1]
        now = self.clock() if now is None else now
        return outcome in FAILED and now - at <= self.failure_memory_s

    def confidence(self, strategy: str, state: Mapping[str, Any]) -> float:
        return self._tally[(strategy, self._situation(state))].rate

    def select_best_strategy(self, state: Mapping[str, Any], errors: Sequence[str],
                             metrics: Mapping[str, float],
                             available_strategies: Sequence[Candidate | str]) -> tuple[str | None, float]:
        target = state.get("target")
        now = self.clock()
        ordered = sorted(enumerate(available_strategies), key=lambda ic: (candidate_rank(ic[1]), ic[0]))
        skipped = []
        for _, cand in ordered:
            name = candidate_name(cand)
            if self.failed_recently(name, target, now):
                skipped.append(name)
                continue
            conf = self.confidence(name, state)
            self.last_reason = ("least invasive candidate that has not failed recently"
                                + (f" (skipped {', '.join(skipped)}: failed within "
                                   f"{self.failure_memory_s:.0f} s)" if skipped else ""))
            return name, round(conf, 4)
        self.last_reason = ("every candidate failed recently on this target: "
                            + ", ".join(skipped) if skipped else "no candidates")
        return None, 0.0

    def record_outcome(self, state: Mapping[str, Any], errors: Sequence[str],
                       metrics: Mapping[str, float], strategy: str | None, outcome: str, *,
                       metrics_after: Mapping[str, float] | None = None,
                       duration_s: float | None = None, at: float | None = None) -> None:
        if strategy is None or outcome not in EXECUTED:
            return
        at = self.clock() if at is None else at
        self._recent[(strategy, state.get("target"))].append((at, outcome))
        tally = self._tally[(strategy, self._situation(state))]
        tally.attempts += 1
        tally.successes += outcome == "success"

    def stats(self) -> list[dict[str, Any]]:
        """What it has learnt, per (strategy, situation): attempts, successes, smoothed rate."""
        return [{"strategy": strategy, "situation": situation, "attempts": t.attempts,
                 "successes": t.successes, "success_rate": round(t.rate, 4)}
                for (strategy, situation), t in sorted(self._tally.items()) if t.attempts]
