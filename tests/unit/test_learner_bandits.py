"""The learners behind make_learner: the protocol, learning from outcomes, drift, the safety rules,
export/import, and the policy's learner: section."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from vllm_otel.learn import (EvidenceError, Learner, LearnerConfig, RuleBasedLearner, RulesLearner,
                             ThompsonLearner, UCBLearner, make_learner)


@dataclass
class Cand:
    name: str
    invasiveness: int


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


STATE = {"alertname": "VllmQueueOverload", "failure_type": "queue_overload", "severity": "warning",
         "target": "i1", "labels": {}}
HIGH_KV = {"up": 1.0, "kv_cache_usage": 0.95}
CANDS = [Cand("restart_engine", 75), Cand("lower_queue_limits", 14), Cand("enable_backpressure", 16)]


def feed(lr: Learner, clock: Clock, strategy: str, outcomes: str, *, state: dict = STATE,
         metrics: dict = HIGH_KV, gap_s: float = 3600.0) -> None:
    """'ssf' -> success, success, failure, each an hour apart, on rotating targets."""
    for i, o in enumerate(outcomes):
        clock.t += gap_s
        lr.record_outcome({**state, "target": f"t{i % 5}"}, [], metrics, strategy,
                          "success" if o == "s" else "no_effect", duration_s=20.0, at=clock.t)


def choices(lr: Learner, n: int = 200, state: dict = STATE, metrics: dict = HIGH_KV,
            cands: list = CANDS) -> dict[str, int]:
    out: dict[str, int] = {}
    for _ in range(n):
        name, _ = lr.select_best_strategy(state, [], metrics, cands)
        out[str(name)] = out.get(str(name), 0) + 1
    return out


@pytest.mark.parametrize("kind", ["thompson", "ucb", "rules", "rule_based"])
def test_every_kind_is_a_learner_and_starts_least_invasive(kind: str) -> None:
    lr = make_learner({"kind": kind})
    assert isinstance(lr, Learner)
    assert lr.select_best_strategy(STATE, [], HIGH_KV, CANDS)[0] == "lower_queue_limits"
    assert lr.select_best_strategy(STATE, [], HIGH_KV, [])[0] is None


def test_default_is_ucb_and_bad_config_is_a_clear_error() -> None:
    assert isinstance(make_learner(), UCBLearner)
    assert isinstance(make_learner({"kind": "thompson"}), ThompsonLearner)
    assert isinstance(make_learner({"kind": "ucb"}), UCBLearner)
    assert isinstance(make_learner({"kind": "rules"}), RulesLearner)
    assert isinstance(make_learner({"kind": "rule_based"}), RuleBasedLearner)
    with pytest.raises(ValueError, match="kind"):
        make_learner({"kind": "neural"})
    with pytest.raises(ValueError, match="ascending"):
        make_learner({"context": {"metrics": {"kv_cache_usage": [0.9, 0.5]}}})


@pytest.mark.parametrize("kind", ["thompson", "ucb", "rules"])
def test_learns_that_a_more_invasive_strategy_works_better(kind: str) -> None:
    clock = Clock()
    lr = make_learner({"kind": kind, "seed": 1}, clock=clock)
    lr.select_best_strategy(STATE, [], HIGH_KV, CANDS)  # learns the candidates' invasiveness
    feed(lr, clock, "lower_queue_limits", "fsffsfff")   # works 1 time in 4
    feed(lr, clock, "enable_backpressure", "ffsf")
    feed(lr, clock, "restart_engine", "sssssssss")
    got = choices(lr)
    assert got.get("restart_engine", 0) >= 160, got


def test_context_keeps_situations_apart() -> None:
    clock = Clock()
    # These outcomes span three days; evidence ageing (half_life_s) has its own test.
    lr = make_learner({"kind": "thompson", "seed": 3, "half_life_s": None}, clock=clock)
    lr.select_best_strategy(STATE, [], HIGH_KV, CANDS)
    low = {"up": 1.0, "kv_cache_usage": 0.4}
    feed(lr, clock, "lower_queue_limits", "ssssssssss", metrics=HIGH_KV)
    feed(lr, clock, "lower_queue_limits", "ffffff", metrics=low, gap_s=8 * 3600)
    feed(lr, clock, "enable_backpressure", "ssssssss", metrics=low)
    # High KV: what worked there wins most of the time (backpressure, untried there but good at
    # low KV, borrows a little of that and is still explored now and then).
    high = choices(lr, metrics=HIGH_KV)
    assert high.get("lower_queue_limits", 0) >= 120, high
    low_got = choices(lr, metrics=low)
    assert low_got.get("enable_backpressure", 0) >= 170 and "lower_queue_limits" not in low_got, low_got


@pytest.mark.parametrize("kind", ["ucb", "thompson"])
def test_drift_recent_outcomes_weigh_more(kind: str) -> None:
    """In a loop: lower_queue_limits works (95 %) for 60 incidents, then stops (10 %) while
    enable_backpressure works (80 %). In each of 8 runs the learner is back on the new best (8 of
    10 choices) within 25 incidents, and sooner over all runs than one that never forgets
    (discount 1, no dropping, no ageing)."""
    import random

    def recovery(cfg: dict, seed: int) -> int:
        clock, rng = Clock(), random.Random(seed)
        lr = make_learner({"kind": kind, "seed": 5, **cfg}, clock=clock)
        picks = []
        for i in range(160):
            clock.t += 3600
            p = {"lower_queue_limits": 0.95 if i < 60 else 0.1, "enable_backpressure": 0.8,
                 "restart_engine": 0.5}
            st = {**STATE, "target": f"t{i % 7}"}
            name, _ = lr.select_best_strategy(st, [], HIGH_KV, CANDS)
            picks.append(name == "enable_backpressure")
            if name is not None:
                ok = rng.random() < p[name]
                lr.record_outcome(st, [], HIGH_KV, name, "success" if ok else "failure", at=clock.t)
        after = picks[60:]
        return next((j + 10 for j in range(len(after) - 9) if sum(after[j:j + 10]) >= 8), 999)

    adaptive = [recovery({}, s) for s in range(8)]
    stuck = [recovery({"discount": 1.0, "drop_after_failures": 1000, "retry_after_s": 0,
                       "half_life_s": None}, s) for s in range(8)]
    assert max(adaptive) <= 25 and sum(adaptive) < sum(stuck), (adaptive, stuck)


def test_drift_a_strategy_left_alone_is_tried_again_when_it_got_better() -> None:
    """Hourly incidents for 16 days: lower_queue_limits works (95 %) and enable_backpressure does
    not (30 %); on day 8 they swap (10 % and 90 %). Backpressure, barely tried in the first week,
    is only found again when its old evidence ages: with ageing the learner is back on it within
    30 incidents in every run, sooner over all runs than when evidence never ages."""
    import random

    def recovery(cfg: dict, seed: int) -> int:
        clock, rng = Clock(), random.Random(seed)
        lr = make_learner({"kind": "ucb", **cfg}, clock=clock)
        picks = []
        for i in range(400):
            clock.t += 3600
            p = {"lower_queue_limits": 0.95 if i < 200 else 0.1,
                 "enable_backpressure": 0.3 if i < 200 else 0.9, "restart_engine": 0.6}
            st = {**STATE, "target": f"t{i % 7}"}
            name, _ = lr.select_best_strategy(st, [], HIGH_KV, CANDS)
            picks.append(name == "enable_backpressure")
            if name is not None:
                ok = rng.random() < p[name]
                lr.record_outcome(st, [], HIGH_KV, name, "success" if ok else "failure", at=clock.t)
        after = picks[200:]
        return next((j + 10 for j in range(len(after) - 9) if sum(after[j:j + 10]) >= 8), 999)

    ageing = [recovery({}, s) for s in range(8)]
    never = [recovery({"half_life_s": None}, s) for s in range(8)]
    assert max(ageing) <= 30 and sum(ageing) < sum(never), (ageing, never)


def test_safety_failed_recently_on_the_target_and_dropped_in_the_context() -> None:
    clock = Clock()
    lr = make_learner({"kind": "thompson", "seed": 2}, clock=clock)
    lr.select_best_strategy(STATE, [], HIGH_KV, CANDS)
    feed(lr, clock, "lower_queue_limits", "s" * 10)
    clock.t += 60
    lr.record_outcome(STATE, [], HIGH_KV, "lower_queue_limits", "failure", at=clock.t)
    name, _ = lr.select_best_strategy(STATE, [], HIGH_KV, CANDS)
    assert name != "lower_queue_limits" and "failed on this target" in lr.last_reason
    other = {**STATE, "target": "elsewhere"}
    assert lr.select_best_strategy(other, [], HIGH_KV, CANDS)[0] == "lower_queue_limits"
    # Three failures in a row in this context: dropped here (any target), not elsewhere.
    for t in ("a", "b"):
        clock.t += 60
        lr.record_outcome({**STATE, "target": t}, [], HIGH_KV, "lower_queue_limits", "interrupted",
                          at=clock.t)
    assert lr.dropped(lr.context(other, HIGH_KV), "lower_queue_limits")
    assert "lower_queue_limits" not in choices(lr, 50, state=other)
    assert "3 times in a row" in lr.last_reason
    low = {"up": 1.0, "kv_cache_usage": 0.4}
    assert not lr.dropped(lr.context(other, low), "lower_queue_limits")
    clock.t += 6 * 3600 + 1  # drop_for_s later it may be tried again
    assert not lr.dropped(lr.context(other, HIGH_KV), "lower_queue_limits")


def test_safety_none_when_nothing_is_worth_trying() -> None:
    clock = Clock()
    lr = make_learner({"drop_after_failures": 1000, "retry_after_s": 0}, clock=clock)
    only = [Cand("restart_engine", 75)]
    lr.select_best_strategy(STATE, [], HIGH_KV, only)
    feed(lr, clock, "restart_engine", "f" * 25)
    assert lr.select_best_strategy(STATE, [], HIGH_KV, only) == (None, 0.0)
    assert "not worth trying" in lr.last_reason


def test_safety_no_riskier_exploration_on_critical_alerts_unless_allowed() -> None:
    clock = Clock()
    crit = {**STATE, "severity": "critical"}
    for allowed in (False, True):
        lr = make_learner({"kind": "thompson", "seed": 4, "explore_in_critical": allowed}, clock=clock)
        lr.select_best_strategy(crit, [], HIGH_KV, CANDS)
        feed(lr, clock, "lower_queue_limits", "sfsfsf", state=crit)  # known, mediocre
        got = choices(lr, 300, state=crit)
        if allowed:
            assert got.get("restart_engine", 0) > 0, got
        else:
            assert "restart_engine" not in got and "enable_backpressure" not in got, got
            assert "critical: not exploring" in lr.last_reason
    # A warning alert explores as usual.
    assert choices(lr, 300).get("restart_engine", 0) > 0


def test_only_executed_outcomes_count_and_confidence_is_the_posterior_mean() -> None:
    clock = Clock()
    lr = make_learner({"context": {"severity": False, "lifecycle": False, "metrics": {}}}, clock=clock)
    for o in ("dry_run", "blocked", "skipped", "rejected", "cancelled"):
        lr.record_outcome(STATE, [], HIGH_KV, "lower_queue_limits", o)
    lr.record_outcome(STATE, [], HIGH_KV, None, "unmapped")
    assert lr.stats() == []
    feed(lr, clock, "lower_queue_limits", "sss")  # Beta(1 + 3 discounted successes, 1)
    name, conf = lr.select_best_strategy(STATE, [], HIGH_KV, CANDS[1:2])
    d = LearnerConfig().discount
    a = 1 + d * d + d + 1
    assert name == "lower_queue_limits" and conf == pytest.approx(a / (a + 1), abs=1e-4)


def test_export_import_json_round_trip_and_bad_input() -> None:
    clock = Clock()
    lr = make_learner({"seed": 1}, clock=clock)
    lr.select_best_strategy(STATE, [], HIGH_KV, CANDS)
    feed(lr, clock, "lower_queue_limits", "ssfsssfs")
    feed(lr, clock, "restart_engine", "ss")
    text = json.dumps(lr.export_state())
    back = make_learner({"seed": 1}, clock=clock)
    back.import_state(json.loads(text))
    assert back.stats() == lr.stats() and back.rules() == lr.rules()
    assert back.failed_recently("lower_queue_limits", "t1") == lr.failed_recently("lower_queue_limits", "t1")
    for bad, msg in (({"format": "pickle"}, "not a vllm-otel learner export"),
                     ({**json.loads(text), "version": 99}, "version 99"),
                     ({**json.loads(text), "contexts": [{"context": [], "strategy": "x", "arm": {}}]},
                      "contexts")):
        with pytest.raises(EvidenceError, match=msg):
            back.import_state(bad)
    assert back.stats() == lr.stats()  # a bad import loses nothing


def test_policy_learner_section_is_validated() -> None:
    from vllm_otel.mitigate.policy import Policy, PolicyError

    base = {"rules": [{"alertname": "A", "strategies": ["reset_prefix_cache"]}],
            "escalation": {"strategy": None}}
    p = Policy.from_mapping({**base, "learner": {"kind": "ucb", "confidence_threshold": 0.7}})
    assert p.config.learner.kind == "ucb" and p.config.learner.confidence_threshold == 0.7
    assert Policy.from_mapping(base).config.learner == LearnerConfig()
    with pytest.raises(PolicyError, match="confidence_threshold"):
        Policy.from_mapping({**base, "learner": {"confidence_threshold": 2}})
    with pytest.raises(PolicyError, match="learner"):
        Policy.from_mapping({**base, "learner": {"discount_rate": 0.9}})
