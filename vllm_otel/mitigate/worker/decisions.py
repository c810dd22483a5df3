"""Deciding: the decision lease taken once per batch of jobs, the guards' answers read into
:class:`~vllm_otel.mitigate.decide.JobFacts`, the pure decision (decide.py), and its record."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any, Callable, Mapping

from vllm_otel.mitigate.decide import CandidateFacts, Decision, JobFacts, Kind, choose, screen
from vllm_otel.mitigate.records import (AlertRecord, GuardDecision, JobRecord, JobState, Mode, Outcome,
                                       Target)
from vllm_otel.mitigate.strategies import Check, MetricsSnapshot, Strategy, StrategyContext
from vllm_otel.redact import redact_text
from vllm_otel.mitigate.worker.base import _DECIDE_LOCK, WorkerBase, _Plan

log = logging.getLogger(__name__)


class Decider(WorkerBase):
    """Decisions under the store's decision lease, in batches."""

    async def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (sync, in a thread) holding the store's decision lease: guard checks and the
        'started' record of one decision are atomic across replicas (rate limit, cooldown).

        Decisions asked for while a batch runs wait for the next one, and each batch (up to
        ``worker.decide_batch``) takes the lease once, syncs the learner once and shares the
        guards' fleet-wide reads (see ``Guardrails.batch``): in a storm, per-decision lease
        round trips and guard reads were most of the worker's time. Within a batch the
        decisions still run one after another, each seeing what the earlier ones recorded."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._decisions.append((fn, args, fut))
        if self._decider is None or self._decider.done():
            self._decider = asyncio.create_task(self._decide_batches(), name="mitigation-decider")
        return await fut

    async def _decide_batches(self) -> None:
        while self._decisions:
            batch = self._decisions[:self.wcfg.decide_batch]
            del self._decisions[:len(batch)]
            live = [(fn, args, fut) for fn, args, fut in batch if not fut.done()]
            try:
                results = await asyncio.to_thread(self._run_batch, [(fn, args) for fn, args, _ in live])
            except asyncio.CancelledError:
                for *_, fut in live + self._decisions:
                    fut.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - each waiting decision gets the error
                results = [(False, e)] * len(live)
            for (_, _, fut), (ok, value) in zip(live, results):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _run_batch(self, items: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[tuple[bool, Any]]:
        owner = f"{self.replica_id}#{uuid.uuid4().hex[:8]}"
        for _ in range(300):
            with self._decide_mutex:
                if self.store.acquire_lock(_DECIDE_LOCK, owner, 30.0, now=self.clock()):
                    try:
                        self.sync_learner()  # what finished since the last batch, before choosing
                        out: list[tuple[bool, Any]] = []
                        with self.guards.batch():
                            for fn, args in items:
                                try:
                                    out.append((True, fn(*args)))
                                except Exception as e:  # noqa: BLE001 - that job's failure only
                                    out.append((False, e))
                        return out
                    finally:
                        self.store.release_lock(_DECIDE_LOCK, owner)
            time.sleep(0.05)  # another replica decides: this is a worker thread, not the loop
        raise TimeoutError("the decision lock stayed taken for 15 s")

    def _facts(self, job: JobRecord, alert: AlertRecord, snap: MetricsSnapshot | None,
               ctx: StrategyContext) -> JobFacts:
        """What the guards answer for this job (the reads of a decision; see decide.py)."""
        g = self.guards
        candidates = []
        allowed = g.target_allowed(alert.instance)
        for name in self.policy.candidates(alert.alertname, alert.labels) or []:
            strat = self.policy.strategy(name)
            checks = [lambda: g.mode_allows(name)]
            if strat.needs_target:
                checks.append(lambda: allowed.model_copy(update={"strategy": name}))
            checks += [lambda: g.circuit_guard(name), lambda: g.cooldown(name, alert.instance)]
            done: list[GuardDecision] = []
            for check in checks:  # up to the first that fails: later ones are not asked
                done.append(check())
                if not done[-1].ok:
                    break
            pre = None
            if done[-1].ok:
                c = self._precondition(strat, ctx)
                pre = GuardDecision(guard="precondition", ok=c.ok, detail=c.reason, strategy=name)
            candidates.append(CandidateFacts(name, tuple(done), pre))
        return JobFacts(
            kill_switch=g.kill_switch(), cancel_requested=job.cancel_requested,
            fresh=(g.alert_fresh(alert), g.metrics_fresh(snap.at if snap else None,
                                                         self.metrics_source is not None)),
            blast_radius=g.blast_radius(), candidates=tuple(candidates),
            metrics_up=snap is not None and snap.values.get("up", 1.0) >= 1.0,
            rechecks=job.rechecks, max_rechecks=self.wcfg.precondition_rechecks)

    def _decide(self, job: JobRecord, alert: AlertRecord, target: Target | None,
                snap: MetricsSnapshot | None, errors: list[str]) -> _Plan:
        """Read the guards, let decide.py decide, record it (under the decision lease)."""
        now = self.clock()
        state = self._state(alert)
        metrics = dict(snap.values) if snap else {}
        base_ctx = StrategyContext(alert=alert, target=target, mode=Mode.AUTO, state=state,
                                   errors=list(errors), metrics_before=metrics,
                                   metrics_at=snap.at if snap else None,
                                   metrics_source=self.metrics_source)

        def stop(d: Decision) -> _Plan:
            """No strategy runs: record why (with every guard decision so far) and finish."""
            assert d.outcome is not None
            aid = self.store.create_action(
                alert_id=alert.id, job_id=job.id, strategy=None, target=alert.instance, mode="none",
                why=d.why, guards=[x.model_dump() for x in d.decisions], state=state, errors=errors,
                metrics_before=metrics, now=now)
            self.store.finish_action(aid, d.outcome, detail=d.why, now=now)
            self.count(None, d.outcome)
            self.count_guards(list(d.decisions))
            self._done(job.id, action_id=aid)
            return _Plan(action_id=aid, escalations=[d.escalation] if d.escalation else [])

        facts = self._facts(job, alert, snap, base_ctx)
        d = screen(facts)
        if d.kind is Kind.STOP:
            return stop(d)
        if d.kind is Kind.DEFER:
            # Look again later; a resolve cancels the job meanwhile.
            when = now + self.wcfg.precondition_recheck_s
            if self.store.defer_job(job.id, self.replica_id, when, now=now):
                log.info("alert %d (%s on %s): no precondition holds now (%s); re-check %d/%d in "
                         "%.0f s", alert.id, alert.alertname, alert.instance, redact_text(d.detail),
                         job.rechecks + 1, self.wcfg.precondition_rechecks,
                         self.wcfg.precondition_recheck_s)
                return _Plan()  # the worker's poll (worker.poll_s) picks it up when due
            return stop(screen(dataclasses.replace(facts, max_rechecks=0)))  # lease lost: no re-check

        available = [self.policy.strategy(n) for n in d.available]
        with self._learner_mutex:
            name, confidence = self.learner.select_best_strategy(state, errors, metrics, available)
            reason = getattr(self.learner, "last_reason", "")
        known = name is not None and name in d.available
        d = choose(d, name, confidence, reason, alertname=alert.alertname, target=alert.instance,
                   learner_name=type(self.learner).__name__,
                   invasiveness=self.policy.strategy(name).invasiveness if known else None,
                   mode=self.policy.mode(name) if known else None,
                   confidence_threshold=self.policy.config.learner.confidence_threshold)
        if d.kind is Kind.STOP:
            return stop(d)
        assert d.strategy is not None
        name, why, decisions = d.strategy, d.why, list(d.decisions)
        self.learner_metrics.selected(state, name)
        mode = {Kind.DRY_RUN: Mode.DRY_RUN, Kind.APPROVAL: Mode.APPROVAL}.get(d.kind, Mode.AUTO)
        params = self.policy.strategy(name).params.model_dump(mode="json")
        ctx = dataclasses.replace(base_ctx, mode=mode, why=why)
        if d.kind is Kind.START:
            # The checks that stop the chosen action, then 'started', all under the lease.
            return self._start(job, alert, name, ctx, decisions, confidence=d.confidence, why=why,
                               params=params, state=state, errors=errors, metrics=metrics)
        aid = self.store.create_action(
            alert_id=alert.id, job_id=job.id, strategy=name, target=alert.instance,
            mode=mode.value, why=why, confidence=d.confidence, params=params,
            guards=[x.model_dump() for x in decisions], state=state, errors=errors,
            metrics_before=metrics, now=now)
        self.count_guards(decisions)
        if d.kind is Kind.DRY_RUN:
            self.store.finish_action(aid, Outcome.DRY_RUN, now=now,
                                     detail=f"dry-run: would run {name} with {params}")
            self.count(name, Outcome.DRY_RUN)
            self._done(job.id, action_id=aid)
            return _Plan(action_id=aid)
        self._done(job.id, JobState.WAITING_APPROVAL, action_id=aid)
        log.info("action %d (%s on %s) awaits approval: POST /actions/%d/approve", aid, name,
                 alert.instance, aid)
        return _Plan(action_id=aid)

    def _start(self, job: JobRecord, alert: AlertRecord, name: str, ctx: StrategyContext,
               decisions: list[GuardDecision], *, action_id: int | None = None,
               confidence: float | None = None, why: str = "", params: Mapping[str, Any] | None = None,
               state: Mapping[str, Any] | None = None, errors: list[str] | None = None,
               metrics: Mapping[str, float] | None = None,
               late_checks: list[GuardDecision] | None = None) -> _Plan:
        """The checks that stop a chosen action, then its 'started' record (under the lock)."""
        g = self.guards
        now = self.clock()
        strat = self.policy.strategy(name)
        # Decided after the action was recorded (approval path): stored with its events.
        late: list[GuardDecision] = list(late_checks or [])

        def record(ds: list[GuardDecision]) -> int:
            # decisions before an approval were counted when the action was proposed
            self.count_guards(late if action_id is not None else ds)
            if action_id is not None:
                return action_id
            return self.store.create_action(
                alert_id=alert.id, job_id=job.id, strategy=name, target=alert.instance,
                mode=Mode.AUTO.value, why=why, confidence=confidence, params=params,
                guards=[d.model_dump() for d in ds], state=state, errors=errors or [],
                metrics_before=metrics, now=now)

        def blocked(outcome: Outcome, detail: str) -> _Plan:
            aid = record(decisions)
            self.store.finish_action(aid, outcome, detail=detail, now=now,
                                     guards=[d.model_dump() for d in late])
            self.count(name, outcome)
            self._done(job.id, action_id=aid)
            return _Plan(action_id=aid)

        checks = [g.rate_limit()] if strat.invasiveness > 0 else []
        for c in checks:
            (late if action_id is not None else decisions).append(c)
            if not c.ok:
                return blocked(Outcome.BLOCKED, f"{c.guard}: {c.detail}")
        lock_owner = None
        if strat.needs_target and alert.instance is not None:
            lock_owner = self._job_owner_lock(job.id)
            c = g.acquire_target(alert.instance, lock_owner)
            (late if action_id is not None else decisions).append(c)
            if not c.ok:
                return blocked(Outcome.BLOCKED, f"{c.guard}: {c.detail}")
        current = self.store.job(job.id)
        if current is not None and current.cancel_requested:
            if lock_owner:
                g.release_target(alert.instance, lock_owner)  # type: ignore[arg-type]
            return blocked(Outcome.CANCELLED, "the alert resolved before the action started")
        aid = record(decisions)
        if not self.store.add_action_event(aid, "started", {"guards": [d.model_dump() for d in late]},
                                           now=now):
            if lock_owner:  # someone else started it (cannot happen under the lock; be safe)
                g.release_target(alert.instance, lock_owner)  # type: ignore[arg-type]
            return _Plan(action_id=aid)
        ctx.action_id = aid
        return _Plan(action_id=aid, strategy=name, ctx=ctx, execute=True, lock_owner=lock_owner)

    @staticmethod
    def _precondition(strat: Strategy, ctx: StrategyContext) -> Check:
        try:
            got = strat.applies(ctx)
        except Exception as e:  # noqa: BLE001 - a broken precondition means "do not run"
            return Check(False, f"precondition raised {type(e).__name__}: {redact_text(e)}")
        if isinstance(got, Check):
            return got
        return Check(bool(got), "" if got else "precondition not met")
