"""The worker's decision for one alert job, as pure functions: from what the guards answered (and,
in a second step, what the learner picked) to a :class:`Decision`.

No store, no HTTP, no clock: the worker reads the guards (``Guardrails``) into :class:`JobFacts`,
calls :func:`screen`, asks the learner among the strategies left, calls :func:`choose`, and then
records and carries out what it got. The order of the checks is the policy's contract:

1. checks that stop everything: kill switch, the alert resolved meanwhile, stale data (alert or
   metrics), blast radius;
2. each candidate strategy in policy order through its own guards (mode, target allowed,
   circuit breaker, cooldown), then its precondition;
3. the learner picks among the candidates left; its mode (dry-run, approval, auto; low
   confidence turns auto into approval) says what happens next.

Every guard decision up to the one that stopped a job is kept (``Decision.decisions``): it goes
into the audit trail with the action.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from vllm_otel.mitigate.records import GuardDecision, Mode, Outcome

__all__ = ["Kind", "Decision", "CandidateFacts", "JobFacts", "screen", "choose"]


class Kind(enum.Enum):
    STOP = "stop"          # no strategy runs: record ``outcome`` with ``why``
    DEFER = "defer"        # look again later (a precondition may hold then)
    PICK = "pick"          # ask the learner among ``available``
    DRY_RUN = "dry_run"    # record what would run
    APPROVAL = "approval"  # record it and wait for a human
    START = "start"        # run ``strategy`` now (the start checks follow under the lease)


@dataclass(frozen=True)
class Decision:
    kind: Kind
    decisions: tuple[GuardDecision, ...] = ()
    outcome: Outcome | None = None
    why: str = ""
    escalation: tuple[str, str] | None = None  # (reason, detail): tell a human
    available: tuple[str, ...] = ()
    strategy: str | None = None
    confidence: float | None = None
    detail: str = ""  # DEFER: why nothing may run now (for the log)


@dataclass(frozen=True)
class CandidateFacts:
    """One candidate strategy's guards, in order (``mode``, ``target_allowed`` when it needs a
    target, ``circuit_breaker``, ``cooldown``) up to the first that failed, and its precondition
    (checked only when every guard allowed it)."""

    name: str
    checks: tuple[GuardDecision, ...]
    precondition: GuardDecision | None = None


@dataclass(frozen=True)
class JobFacts:
    kill_switch: GuardDecision
    cancel_requested: bool
    fresh: tuple[GuardDecision, ...]       # the alert's age, the metrics' age
    blast_radius: GuardDecision
    candidates: tuple[CandidateFacts, ...] | None  # None or empty: the rule lists no strategies
    metrics_up: bool = False               # live metrics of a target that answers (re-checks)
    rechecks: int = 0                      # times this job was deferred already
    max_rechecks: int = 0


def _stop(decisions: list[GuardDecision], outcome: Outcome, why: str,
          escalation: tuple[str, str] | None = None) -> Decision:
    return Decision(Kind.STOP, tuple(decisions), outcome=outcome, why=why, escalation=escalation)


def screen(f: JobFacts) -> Decision:
    """Steps 1 and 2: STOP, DEFER, or PICK with the strategies that may run."""
    decisions: list[GuardDecision] = [f.kill_switch]
    if not f.kill_switch.ok:
        return _stop(decisions, Outcome.BLOCKED, f"kill switch: {f.kill_switch.detail}")
    if f.cancel_requested:
        return _stop(decisions, Outcome.CANCELLED, "the alert resolved before any action")
    for d in f.fresh:
        decisions.append(d)
        if not d.ok:
            return _stop(decisions, Outcome.BLOCKED, f"stale data: {d.detail}", ("stale_data", d.detail))
    decisions.append(f.blast_radius)
    if not f.blast_radius.ok:
        return _stop(decisions, Outcome.BLOCKED, f"blast radius: {f.blast_radius.detail}",
                     ("blast_radius", f.blast_radius.detail))
    if not f.candidates:
        return _stop(decisions, Outcome.SKIPPED, "the matching policy rule lists no strategies (record only)")
    available: list[str] = []
    for c in f.candidates:
        failed = next((d for d in c.checks if not d.ok), None)
        if failed is not None:
            decisions += c.checks[:c.checks.index(failed) + 1]
            continue
        if c.precondition is None:
            raise ValueError(f"candidate {c.name}: every guard allowed it, but no precondition given")
        decisions += [*c.checks, c.precondition]
        if c.precondition.ok:
            available.append(c.name)
    if available:
        return Decision(Kind.PICK, tuple(decisions), available=tuple(available))
    failed_all = [d for d in decisions if not d.ok]
    only_pre = all(d.guard in ("precondition", "mode") for d in failed_all)
    summary = "; ".join(f"{d.strategy}: {d.guard} ({d.detail})" for d in failed_all)
    if (f.metrics_up and only_pre and any(d.guard == "precondition" for d in failed_all)
            and f.rechecks < f.max_rechecks):
        # The alert fired because its condition held for the rule's hold time; one snapshot
        # where the pressure eased (a burst ended, a scrape in between) is not a reason to drop
        # it. Only with live metrics of a target that answers: otherwise a re-check learns nothing.
        return Decision(Kind.DEFER, tuple(decisions), detail=summary)
    rechecked = f" (after {f.rechecks} re-checks)" if f.rechecks else ""
    return _stop(decisions, Outcome.SKIPPED if only_pre else Outcome.BLOCKED,
                 f"no candidate strategy may run{rechecked}: {summary}")


def choose(screened: Decision, picked: str | None, confidence: float, reason: str, *,
           alertname: str, target: str | None, learner_name: str, invasiveness: int | None,
           mode: Mode | None, confidence_threshold: float | None) -> Decision:
    """Step 3, after the learner answered ``picked`` (None: none) among ``screened.available``;
    ``invasiveness`` and ``mode`` are the picked strategy's."""
    decisions = list(screened.decisions)
    available: Sequence[str] = screened.available
    if picked is None:
        why = f"learner chose none of {list(available)}: {reason}"
        return _stop(decisions, Outcome.SKIPPED, why, ("exhausted", why))
    if picked not in available or mode is None:
        return _stop(decisions, Outcome.SKIPPED, f"learner chose {picked!r}, which is not available")
    why = (f"{alertname} on {target}: {learner_name} chose {picked} (invasiveness {invasiveness}, "
           f"confidence {confidence:.2f}) among {list(available)}" + (f": {reason}" if reason else ""))
    if mode is Mode.AUTO and confidence_threshold is not None and confidence < confidence_threshold:
        mode = Mode.APPROVAL
        why += f"; confidence below learner.confidence_threshold ({confidence_threshold:.2f}): approval needed"
    kind = {Mode.DRY_RUN: Kind.DRY_RUN, Mode.APPROVAL: Kind.APPROVAL}.get(mode, Kind.START)
    return Decision(kind, tuple(decisions), why=why, strategy=picked, confidence=confidence)
