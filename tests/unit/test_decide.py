"""The worker's decision as pure functions (vllm_otel.mitigate.decide): guard answers in, a
decision out. No store, no services."""

from __future__ import annotations

import dataclasses

import pytest

from vllm_otel.mitigate.decide import CandidateFacts, JobFacts, Kind, choose, screen
from vllm_otel.mitigate.records import GuardDecision, Mode, Outcome


def ok(guard: str, strategy: str | None = None, detail: str = "") -> GuardDecision:
    return GuardDecision(guard=guard, ok=True, detail=detail, strategy=strategy)


def no(guard: str, strategy: str | None = None, detail: str = "nope") -> GuardDecision:
    return GuardDecision(guard=guard, ok=False, detail=detail, strategy=strategy)


def cand(name: str, *, fail: str | None = None, pre: bool = True) -> CandidateFacts:
    checks = []
    for guard in ("mode", "target_allowed", "circuit_breaker", "cooldown"):
        checks.append(no(guard, name) if guard == fail else ok(guard, name))
        if guard == fail:
            return CandidateFacts(name, tuple(checks))
    return CandidateFacts(name, tuple(checks), ok("precondition", name) if pre
                          else no("precondition", name, "load is fine now"))


FACTS = JobFacts(kill_switch=ok("kill_switch"), cancel_requested=False,
                 fresh=(ok("stale_data"), ok("stale_data")), blast_radius=ok("blast_radius"),
                 candidates=(cand("a"), cand("b")), metrics_up=True, rechecks=0, max_rechecks=2)


def facts(**over: object) -> JobFacts:
    return dataclasses.replace(FACTS, **over)


def test_every_guard_passing_leaves_every_candidate_in_policy_order() -> None:
    d = screen(FACTS)
    assert d.kind is Kind.PICK and d.available == ("a", "b")
    assert [x.guard for x in d.decisions[:4]] == ["kill_switch", "stale_data", "stale_data", "blast_radius"]
    assert len(d.decisions) == 4 + 2 * 5  # each candidate: 4 guards and its precondition


@pytest.mark.parametrize("over, outcome, why, escalation", [
    ({"kill_switch": no("kill_switch", detail="engaged via API")}, Outcome.BLOCKED,
     "kill switch: engaged via API", None),
    ({"cancel_requested": True}, Outcome.CANCELLED, "the alert resolved before any action", None),
    ({"fresh": (no("stale_data", detail="alert started 4000 s ago"), ok("stale_data"))}, Outcome.BLOCKED,
     "stale data: alert started 4000 s ago", ("stale_data", "alert started 4000 s ago")),
    ({"blast_radius": no("blast_radius", detail="9/10 targets")}, Outcome.BLOCKED,
     "blast radius: 9/10 targets", ("blast_radius", "9/10 targets")),
    ({"candidates": ()}, Outcome.SKIPPED, "the matching policy rule lists no strategies (record only)", None),
])
def test_a_check_that_stops_everything_stops_with_its_reason(over: dict, outcome: Outcome, why: str,
                                                             escalation: tuple | None) -> None:
    d = screen(facts(**over))
    assert (d.kind, d.outcome, d.why, d.escalation) == (Kind.STOP, outcome, why, escalation)
    recorded = {"kill_switch": 1, "cancel_requested": 1, "fresh": 2, "blast_radius": 4, "candidates": 4}
    assert len(d.decisions) == recorded[next(iter(over))]  # every check up to the one that stopped it


def test_the_kill_switch_wins_over_everything_after_it() -> None:
    d = screen(facts(kill_switch=no("kill_switch"), cancel_requested=True, blast_radius=no("blast_radius")))
    assert d.outcome is Outcome.BLOCKED and [x.guard for x in d.decisions] == ["kill_switch"]


def test_a_failed_guard_removes_only_its_candidate_and_is_recorded() -> None:
    d = screen(facts(candidates=(cand("a", fail="cooldown"), cand("b"))))
    assert d.kind is Kind.PICK and d.available == ("b",)
    assert no("cooldown", "a") in d.decisions and not any(x.strategy == "a" and x.guard == "precondition"
                                                          for x in d.decisions)


def test_no_candidate_left_by_guards_is_blocked_with_every_reason() -> None:
    d = screen(facts(candidates=(cand("a", fail="circuit_breaker"), cand("b", fail="mode"))))
    assert (d.kind, d.outcome) == (Kind.STOP, Outcome.BLOCKED)
    assert d.why == "no candidate strategy may run: a: circuit_breaker (nope); b: mode (nope)"
    assert d.escalation is None


def test_preconditions_that_do_not_hold_defer_while_rechecks_are_left_then_skip() -> None:
    only_pre = (cand("a", pre=False), cand("b", pre=False))
    assert screen(facts(candidates=only_pre)).kind is Kind.DEFER
    last = screen(facts(candidates=only_pre, rechecks=2))
    assert (last.kind, last.outcome) == (Kind.STOP, Outcome.SKIPPED)
    assert last.why.startswith("no candidate strategy may run (after 2 re-checks): a: precondition")
    # Without live metrics of a target that answers, a re-check would learn nothing.
    assert screen(facts(candidates=only_pre, metrics_up=False)).outcome is Outcome.SKIPPED
    # A guard (not only a precondition) said no: blocked at once, no re-check.
    mixed = screen(facts(candidates=(cand("a", pre=False), cand("b", fail="cooldown"))))
    assert (mixed.kind, mixed.outcome) == (Kind.STOP, Outcome.BLOCKED)


def pick(name: str | None, *, confidence: float = 0.9, mode: Mode | None = Mode.AUTO,
         threshold: float | None = None):  # noqa: ANN201
    return choose(screen(FACTS), name, confidence, "best so far", alertname="VllmX", target="t1",
                  learner_name="UCB", invasiveness=10, mode=mode, confidence_threshold=threshold)


def test_the_learners_pick_runs_in_its_strategys_mode() -> None:
    d = pick("b")
    assert (d.kind, d.strategy, d.confidence) == (Kind.START, "b", 0.9)
    assert d.why == "VllmX on t1: UCB chose b (invasiveness 10, confidence 0.90) among ['a', 'b']: best so far"
    assert d.decisions == screen(FACTS).decisions
    assert pick("a", mode=Mode.DRY_RUN).kind is Kind.DRY_RUN
    assert pick("a", mode=Mode.APPROVAL).kind is Kind.APPROVAL


def test_low_confidence_turns_auto_into_approval_only() -> None:
    d = pick("a", confidence=0.3, threshold=0.5)
    assert d.kind is Kind.APPROVAL and "confidence below learner.confidence_threshold (0.50)" in d.why
    assert pick("a", confidence=0.3, threshold=0.5, mode=Mode.DRY_RUN).kind is Kind.DRY_RUN
    assert pick("a", confidence=0.7, threshold=0.5).kind is Kind.START


def test_no_pick_or_an_unavailable_pick_is_skipped() -> None:
    none = pick(None)
    assert (none.kind, none.outcome) == (Kind.STOP, Outcome.SKIPPED)
    assert none.escalation == ("exhausted", "learner chose none of ['a', 'b']: best so far")
    stray = pick("c", mode=None)
    assert (stray.outcome, stray.why) == (Outcome.SKIPPED, "learner chose 'c', which is not available")


def test_a_candidate_cleared_by_its_guards_needs_its_precondition() -> None:
    with pytest.raises(ValueError, match="no precondition"):
        screen(facts(candidates=(CandidateFacts("a", (ok("mode", "a"),)),)))
