"""Acting: a decided job's action run and verified (at most ``worker.concurrency`` at once), an
approved action re-checked and run, escalations to a human."""

from __future__ import annotations

import asyncio
import logging
import time

from vllm_otel.mitigate.records import FAILED_OUTCOMES, AlertRecord, JobRecord, Mode, Outcome, Target
from vllm_otel.mitigate.strategies import ActionResult, MetricsSnapshot, StrategyContext, Verification
from vllm_otel.redact import redact_text
from vllm_otel.mitigate.worker.base import _Plan
from vllm_otel.mitigate.worker.decisions import Decider

log = logging.getLogger(__name__)


class Actor(Decider):
    """Runs what the decisions started."""

    async def _decide_and_run(self, job: JobRecord, alert: AlertRecord) -> None:
        target = self.policy.target(alert.instance)
        snap = await self._snapshot(target)
        errors = await asyncio.to_thread(self.store.recent_errors, alert.instance,
                                         since=self.clock() - 3600.0)
        plan: _Plan = await self._locked(self._decide, job, alert, target, snap, errors)
        for reason, detail in plan.escalations:
            await self._escalate(alert, target, reason, detail, snap, errors)
        if plan.execute:
            await self._run_action(plan, job.id)

    async def _run_approved(self, job: JobRecord, alert: AlertRecord, action_id: int,
                            name: str) -> None:
        """A human approved: check what may have changed since (kill switch, breaker, cooldown,
        target busy, rate limit), then run it."""
        target = self.policy.target(alert.instance)
        snap = await self._snapshot(target)
        errors = await asyncio.to_thread(self.store.recent_errors, alert.instance,
                                         since=self.clock() - 3600.0)
        action = await asyncio.to_thread(self.store.action, action_id)
        assert action is not None

        def decide() -> _Plan:
            g = self.guards
            checks = [g.kill_switch(), g.mode_allows(name)]
            if self.policy.strategy(name).needs_target:
                checks.append(g.target_allowed(alert.instance))
            checks += [g.circuit_guard(name), g.cooldown(name, alert.instance)]
            failed = next((c for c in checks if not c.ok), None)
            if failed is not None:
                self.store.finish_action(action_id, Outcome.BLOCKED, now=self.clock(),
                                         detail=f"approved, then {failed.guard}: {failed.detail}",
                                         guards=[c.model_dump() for c in checks])
                self.count(name, Outcome.BLOCKED)
                self._done(job.id)
                return _Plan(action_id=action_id)
            before = dict(snap.values) if snap else {k: float(v) for k, v in action.metrics_before.items()}
            ctx = StrategyContext(alert=alert, target=target, mode=Mode.APPROVAL, why=action.why,
                                  state=self._state(alert), errors=list(errors),
                                  metrics_before=before, metrics_at=snap.at if snap else None,
                                  metrics_source=self.metrics_source, action_id=action_id)
            return self._start(job, alert, name, ctx, [], action_id=action_id, late_checks=checks)

        plan: _Plan = await self._locked(decide)
        if plan.execute:
            await self._run_action(plan, job.id)

    async def _run_action(self, plan: _Plan, job_id: int | None) -> None:
        """Run a started action, at most ``worker.concurrency`` at once (a job waiting for a slot
        has its target's lease and its 'started' record already; deciding goes on meanwhile)."""
        self._now_acting()
        loop = asyncio.get_running_loop()
        if self._action_slots is None or self._slots_loop is not loop:  # bound to its loop, as drain()'s
            self._action_slots, self._slots_loop = asyncio.Semaphore(self.wcfg.concurrency), loop
        slots = self._action_slots
        try:
            await slots.acquire()
        except asyncio.CancelledError:  # shutting down before it ran: recorded, target freed
            await asyncio.shield(asyncio.to_thread(self._interrupted, plan, job_id))
            if plan.lock_owner and plan.ctx is not None and plan.ctx.alert.instance:
                await asyncio.shield(asyncio.to_thread(self.guards.release_target, plan.ctx.alert.instance,
                                                       plan.lock_owner))
            raise
        try:
            await self._run_started(plan, job_id)
        finally:
            slots.release()

    async def _run_started(self, plan: _Plan, job_id: int | None) -> None:
        assert plan.ctx is not None and plan.strategy is not None and plan.action_id is not None
        name, ctx = plan.strategy, plan.ctx
        strat = self.policy.strategy(name)
        timeout = self.wcfg.action_timeout_s
        t0 = time.monotonic()
        finished = False
        try:
            was_open = (await asyncio.to_thread(self.guards.circuit, name)).open
            try:
                result = await asyncio.wait_for(strat.execute(ctx, self.actuator), timeout)
                if not isinstance(result, ActionResult):
                    result = ActionResult(ok=False, detail=f"execute returned {type(result).__name__}, "
                                                           "not ActionResult")
            except asyncio.TimeoutError:
                result = ActionResult(ok=False, detail=f"timed out after {timeout:.0f} s")
            except Exception as e:  # noqa: BLE001 - the strategy's failure is an outcome
                result = ActionResult(ok=False, detail=f"{type(e).__name__}: {redact_text(e)}")
            ctx.result = result
            verification: Verification | None = None
            if result.ok:
                if self.wcfg.verify_delay_s > 0:
                    await asyncio.sleep(self.wcfg.verify_delay_s)
                try:
                    ctx.metrics_after = await asyncio.wait_for(ctx.fresh_metrics(), 15.0)
                except Exception as e:  # noqa: BLE001
                    log.warning("metrics after %s unavailable: %s", name, redact_text(e))
                try:
                    verification = await asyncio.wait_for(strat.verify(ctx), timeout)
                except Exception as e:  # noqa: BLE001
                    verification = Verification(ok=False, detail=f"verify raised {type(e).__name__}: "
                                                                 f"{redact_text(e)}")
                outcome = Outcome.SUCCESS if verification.ok else Outcome.NO_EFFECT
            else:
                outcome = Outcome.FAILURE
            duration = time.monotonic() - t0
            detail = (verification.detail if verification is not None else result.detail) or outcome.value
            await asyncio.to_thread(
                self.store.finish_action, plan.action_id, outcome, detail=detail,
                result=result.model_dump(mode="json"),
                verification=None if verification is None else verification.model_dump(mode="json"),
                metrics_after=ctx.metrics_after, duration_s=round(duration, 6), now=self.clock())
            finished = True
            self.count(name, outcome)
            # Hand the outcome to the learner now, not at the next decision: what it learnt is
            # visible (and survives in the store) as soon as the action is done.
            await asyncio.to_thread(self.sync_learner)
            self.metrics.action_seconds.labels(name).observe(duration)
            if job_id is not None:
                await asyncio.to_thread(self._done, job_id)
            log.info("action %d %s on %s: %s (%s)", plan.action_id, name,
                     ctx.target.instance if ctx.target else "-", outcome.value, redact_text(detail))
            if outcome.value in FAILED_OUTCOMES and name != self.policy.escalation_strategy:
                now_open = (await asyncio.to_thread(self.guards.circuit, name))
                if now_open.open and not was_open:
                    await self._escalate(ctx.alert, ctx.target, "circuit_open",
                                         f"circuit breaker of {name} opened: {now_open.detail}",
                                         None, ctx.errors)
        except asyncio.CancelledError:
            if not finished:
                await asyncio.shield(asyncio.to_thread(self._interrupted, plan, job_id))
            raise
        finally:
            if plan.lock_owner and ctx.alert.instance:
                await asyncio.shield(asyncio.to_thread(self.guards.release_target, ctx.alert.instance,
                                                       plan.lock_owner))

    def _interrupted(self, plan: _Plan, job_id: int | None) -> None:
        assert plan.action_id is not None
        if self.store.finish_action(plan.action_id, Outcome.INTERRUPTED, now=self.clock(),
                                    detail="the receiver stopped while this action ran; not re-run"):
            self.count(plan.strategy, Outcome.INTERRUPTED)
        if job_id is not None:
            self._done(job_id)

    async def _escalate(self, alert: AlertRecord, target: Target | None, reason: str, detail: str,
                        snap: MetricsSnapshot | None, errors: list[str]) -> None:
        """Automation stopped: count it, and tell a human through the escalation strategy."""
        self.metrics.escalations.labels(reason).inc()
        log.warning("escalating %s on %s (%s): %s", alert.alertname, alert.instance, reason,
                    redact_text(detail))
        cfg = self.policy.config.escalation
        name = cfg.strategy
        if name is None or reason not in cfg.when:
            return

        def decide() -> _Plan:
            g = self.guards
            now = self.clock()
            mode = self.policy.mode(name)
            checks = [g.kill_switch(), g.mode_allows(name), g.cooldown(name, alert.instance)]
            why = f"escalation ({reason}): {detail}"
            strat = self.policy.strategy(name)
            aid = self.store.create_action(
                alert_id=alert.id, job_id=None, strategy=name, target=alert.instance, mode=mode.value,
                why=why, confidence=None, params=strat.params.model_dump(mode="json"),
                guards=[c.model_dump() for c in checks], state=self._state(alert), errors=errors,
                metrics_before=dict(snap.values) if snap else {}, now=now)
            failed = next((c for c in checks if not c.ok), None)
            if failed is not None:
                self.store.finish_action(aid, Outcome.BLOCKED, detail=f"{failed.guard}: {failed.detail}",
                                         now=now)
                self.count(name, Outcome.BLOCKED)
                return _Plan(action_id=aid)
            if mode is Mode.DRY_RUN:
                self.store.finish_action(aid, Outcome.DRY_RUN, detail=f"dry-run: would escalate ({reason})",
                                         now=now)
                self.count(name, Outcome.DRY_RUN)
                return _Plan(action_id=aid)
            # Approval for an escalation would ask a human whether to ask a human: it runs.
            if not self.store.add_action_event(aid, "started", now=now):
                return _Plan(action_id=aid)
            ctx = StrategyContext(alert=alert, target=target, mode=mode, why=why,
                                  state=self._state(alert), errors=list(errors),
                                  metrics_before=dict(snap.values) if snap else {},
                                  metrics_source=self.metrics_source, action_id=aid)
            return _Plan(action_id=aid, strategy=name, ctx=ctx, execute=True)

        try:
            plan: _Plan = await self._locked(decide)
            if plan.execute:
                await self._run_action(plan, None)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failed escalation must not lose the job's own record
            log.exception("escalation of %s failed", alert.alertname)
            self.metrics.worker_errors.inc()
