"""The learner interface and the rule-based learner: least invasive first, skipping what failed
recently. (The receiver's replay of stored outcomes into a learner is in test_receiver_restart.py.)"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_otel.learn.learner import Learner, RuleBasedLearner


@dataclass
class Cand:
    name: str
    invasiveness: int


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


STATE = {"alertname": "VllmKvCacheNearlyFull", "failure_type": "kv_cache_exhaustion", "target": "i1"}
CANDS = [Cand("restart", 80), Cand("reset_cache", 10), Cand("limit", 10), Cand("notify", 0)]


def test_it_is_a_learner() -> None:
    assert isinstance(RuleBasedLearner(), Learner)


def test_least_invasive_first_policy_order_breaks_ties() -> None:
    lr = RuleBasedLearner()
    assert lr.select_best_strategy(STATE, [], {}, CANDS[:3]) == ("reset_cache", 0.5)
    assert lr.select_best_strategy(STATE, [], {}, CANDS)[0] == "notify"
    # Bare names carry no rank: the given order is kept.
    assert lr.select_best_strategy(STATE, [], {}, ["b", "a"])[0] == "b"
    assert lr.select_best_strategy(STATE, [], {}, []) == (None, 0.0)


def test_skips_what_failed_recently_on_the_same_target() -> None:
    clock = Clock()
    lr = RuleBasedLearner(failure_memory_s=600, clock=clock)
    lr.record_outcome(STATE, [], {}, "reset_cache", "failure", at=clock())
    assert lr.select_best_strategy(STATE, [], {}, CANDS[:3])[0] == "limit"
    assert "skipped reset_cache" in lr.last_reason
    # Another target is unaffected.
    other = {**STATE, "target": "i2"}
    assert lr.select_best_strategy(other, [], {}, CANDS[:3])[0] == "reset_cache"
    lr.record_outcome(STATE, [], {}, "limit", "no_effect", at=clock())
    assert lr.select_best_strategy(STATE, [], {}, CANDS[:3])[0] == "restart"
    lr.record_outcome(STATE, [], {}, "restart", "interrupted", at=clock())
    assert lr.select_best_strategy(STATE, [], {}, CANDS[:3]) == (None, 0.0)
    assert "every candidate failed recently" in lr.last_reason
    # Memory fades ...
    clock.t += 601
    assert lr.select_best_strategy(STATE, [], {}, CANDS[:3])[0] == "reset_cache"
    # ... and a later success clears a failure at once.
    lr.record_outcome(STATE, [], {}, "limit", "failure", at=clock())
    lr.record_outcome(STATE, [], {}, "limit", "success", at=clock())
    assert not lr.failed_recently("limit", "i1")


def test_only_executed_outcomes_teach_it() -> None:
    lr = RuleBasedLearner()
    for outcome in ("dry_run", "blocked", "skipped", "unmapped", "cancelled", "rejected"):
        lr.record_outcome(STATE, [], {}, "reset_cache", outcome)
    lr.record_outcome(STATE, [], {}, None, "unmapped")
    assert lr.select_best_strategy(STATE, [], {}, CANDS[:3]) == ("reset_cache", 0.5)


def test_confidence_is_the_smoothed_success_rate_per_situation() -> None:
    clock = Clock()
    lr = RuleBasedLearner(failure_memory_s=0, clock=clock)
    for outcome in ("success", "success", "success", "failure"):
        clock.t += 1
        lr.record_outcome(STATE, [], {}, "reset_cache", outcome, at=clock())
    clock.t += 1
    name, conf = lr.select_best_strategy(STATE, [], {}, CANDS[:3])
    assert name == "reset_cache" and conf == round(4 / 6, 4)
    other_situation = {**STATE, "failure_type": "queue_overload"}
    assert lr.select_best_strategy(other_situation, [], {}, CANDS[:3])[1] == 0.5

