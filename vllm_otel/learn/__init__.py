"""Continuous learning: which mitigation works, learnt from the outcomes the receiver records.

``make_learner(config)`` builds the learner the policy's ``learner:`` section asks for (Bayes-UCB
on Beta posteriors by default, the lowest regret in benchmarks/learner_sim.py); every learner
implements :class:`~vllm_otel.learn.learner.Learner`. Nothing in this package imports the
mitigation package: data flows mitigate -> learn, never back.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from vllm_otel.learn.bandits import ContextualLearner, ThompsonLearner, UCBLearner
from vllm_otel.learn.config import LEARNER_KINDS, ContextConfig, LearnerConfig, RewardConfig
from vllm_otel.learn.evidence import EvidenceError
from vllm_otel.learn.learner import Candidate, Learner, RuleBasedLearner
from vllm_otel.learn.rules import Rule, RulesLearner, extract_rules

__all__ = ["make_learner", "Learner", "Candidate", "LearnerConfig", "ContextConfig", "RewardConfig",
           "RuleBasedLearner", "ThompsonLearner", "UCBLearner", "RulesLearner", "ContextualLearner",
           "Rule", "extract_rules", "EvidenceError", "LEARNER_KINDS", "replay_store", "describe_learner"]

_KINDS: dict[str, type[ContextualLearner]] = {"thompson": ThompsonLearner, "ucb": UCBLearner,
                                               "rules": RulesLearner}
DEFAULT_HISTORY_S = 7 * 86400.0


def make_learner(config: LearnerConfig | Mapping[str, Any] | None = None, *,
                 clock: Callable[[], float] = time.time, store: Any = None,
                 history_s: float = DEFAULT_HISTORY_S) -> Learner:
    """The configured learner (``config``: the policy's ``learner:`` section, a mapping or None for
    the defaults). With ``store``, it is rebuilt from the outcomes recorded there within
    ``history_s`` (its ``synced_through`` is the last outcome id it took in)."""
    cfg = config if isinstance(config, LearnerConfig) else LearnerConfig.model_validate(dict(config or {}))
    if cfg.kind == "rule_based":
        learner: Learner = RuleBasedLearner(failure_memory_s=cfg.retry_after_s, clock=clock)
    else:
        learner = _KINDS[cfg.kind](cfg, clock=clock)
    if store is not None:
        replay_store(learner, store, since=clock() - history_s)
    return learner


def replay_store(learner: Learner, store: Any, *, since: float | None = None, after_id: int = 0) -> int:
    """Feed ``learner`` the store's outcomes (oldest first) after ``after_id``; returns how many."""
    n = 0
    while True:
        batch = store.outcomes(after_id=after_id, since=since, limit=1000)
        for o in batch:
            learner.record_outcome(o.state, o.errors, o.metrics, o.strategy, o.outcome,
                                   metrics_after=o.metrics_after, duration_s=o.duration_s, at=o.at)
            after_id = o.id
            n += 1
        if len(batch) < 1000:
            break
    if hasattr(learner, "synced_through"):
        learner.synced_through = after_id  # type: ignore[union-attr]
    return n


def describe_learner(learner: Learner) -> dict[str, Any]:
    """What ``GET /learner`` and ``vllm-otel learner show`` print: the learner's kind, per
    situation and strategy what it has learnt (``stats``), and the rules mined from it."""
    def call(name: str) -> Any:
        fn = getattr(learner, name, None)
        return fn() if callable(fn) else None

    return {"learner": type(learner).__name__, "kind": getattr(learner, "kind", "rule_based"),
            "stats": call("stats"), "rules": call("rules") or []}
