"""The mitigation worker: takes alert jobs from the store and turns each into one guarded,
verified action (or a recorded reason not to act), then hands the outcome to the learner.

One decision at a time across all replicas: guard checks and the action's 'started' record are
taken under a lease in the store, so the rate limit and cooldowns hold with several replicas.
The action itself runs outside that lease, holding only its target (one action per target).
An action that may have half-happened is never re-run: a runner that dies mid-action leaves it
``interrupted`` for the learner and the audit trail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from vllm_otel.learn import make_learner
from vllm_otel.learn.learner import Learner
from vllm_otel.learn.metrics import LearnerMetrics
from vllm_otel.mitigate.models import (FAILED_OUTCOMES, AlertRecord, GuardDecision, JobRecord,
                                       JobState, Mode, Outcome, Target)
from vllm_otel.mitigate.policy import Guardrails, Policy, WorkerConfig
from vllm_otel.mitigate.strategies import (ActionResult, Actuator, Check, MetricsSnapshot,
                                           MetricsSource, Strategy, StrategyContext,
                                           UnavailableActuator, Verification)
from vllm_otel.redact import redact_text
from vllm_otel.mitigate.store import Store

__all__ = ["Worker", "MitigationMetrics"]

log = logging.getLogger(__name__)

_DECIDE_LOCK = "decide"
# While webhooks keep arriving, the background loop takes at most worker.busy_share of the wall
# time (default 0.15: one job at a time, then a pause of ~5.7x its duration). The worker shares the
# process, its GIL and, on small hosts, the CPUs with the intake: a storm of alerts must be stored
# first and quickly; the work queue is durable, so the jobs wait, and the worker catches up when
# the storm ends.
_NOT_LOCKED = object()


# --- metrics ----------------------------------------------------------------------------------------

class _StoreCollector:
    """Facts that live in the store (shared by replicas), read at scrape time."""

    def __init__(self, worker: "Worker") -> None:
        self.r = worker

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily("vllm_otel_receiver_store_up", "1 when the store answered this scrape")
        try:
            self.r.store.ping()  # the write side: reads may still be served from open connections
            circuit = GaugeMetricFamily(
                "vllm_otel_mitigation_circuit_open",
                "1 while the strategy's circuit breaker is open (repeated failures): page a human",
                labels=["strategy"])
            for name in self.r.policy.strategy_names():
                circuit.add_metric([name], 1.0 if self.r.guards.circuit(name).open else 0.0)
            kill = GaugeMetricFamily("vllm_otel_mitigation_kill_switch",
                                     "1 while the kill switch stops every action")
            kill.add_metric([], 0.0 if self.r.guards.kill_switch().ok else 1.0)
            jobs = GaugeMetricFamily("vllm_otel_receiver_jobs", "mitigation jobs by state",
                                     labels=["state"])
            for state, n in self.r.store.job_counts().items():
                jobs.add_metric([state], float(n))
            up.add_metric([], 1.0)
            yield from (circuit, kill, jobs, up)
        except Exception:  # noqa: BLE001 - a scrape must still say the store is down
            log.exception("store unavailable during scrape")
            up.add_metric([], 0.0)
            yield up


class MitigationMetrics:
    """Everything the receiver exports on /metrics (the worker's and the HTTP side's)."""

    def __init__(self, registry: CollectorRegistry, worker: "Worker") -> None:
        self.registry = registry
        self.mitigations = Counter("vllm_otel_mitigations", "finished mitigation decisions",
                                   ["strategy", "outcome"], registry=registry)
        self.guard_decisions = Counter("vllm_otel_mitigation_guard_decisions",
                                       "guard checks recorded with a decision, by guard and decision "
                                       "(allow, deny)", ["guard", "decision"], registry=registry)
        self.escalations = Counter("vllm_otel_mitigation_escalations",
                                   "times automation stopped and asked for a human", ["reason"],
                                   registry=registry)
        self.action_seconds = Histogram("vllm_otel_mitigation_action_duration_seconds",
                                        "execute + verify time of executed actions", ["strategy"],
                                        buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                        registry=registry)
        self.webhooks = Counter("vllm_otel_receiver_webhooks", "webhook requests by HTTP status",
                                ["code"], registry=registry)
        self.webhook_seconds = Histogram(
            "vllm_otel_receiver_webhook_duration_seconds",
            "POST /webhook in the receiver: request handed to the app -> answer ready (202: stored "
            "and committed)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry)
        self.alerts = Counter("vllm_otel_receiver_alerts", "alerts received",
                              ["status", "result"], registry=registry)
        self.truncated = Counter("vllm_otel_receiver_truncated_alerts",
                                 "alerts Alertmanager left out of notifications (max_alerts)",
                                 registry=registry)
        self.store_errors = Counter("vllm_otel_receiver_store_errors",
                                    "store failures while handling webhooks", registry=registry)
        self.worker_errors = Counter("vllm_otel_receiver_worker_errors",
                                     "unexpected errors in the background worker", registry=registry)
        self.heartbeat = Gauge("vllm_otel_receiver_worker_heartbeat_timestamp_seconds",
                               "last time the worker loop ran", registry=registry)
        registry.register(_StoreCollector(worker))  # type: ignore[arg-type]


# --- the worker ---------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What a decision leaves to do outside the decision lock."""

    action_id: int | None = None
    strategy: str | None = None
    ctx: StrategyContext | None = None
    execute: bool = False
    lock_owner: str | None = None
    escalations: list[tuple[str, str]] = field(default_factory=list)


class Worker:
    """Claims jobs, decides with the guards and the learner, acts, verifies, records."""

    def __init__(self, policy: Policy, store: Store, *, actuator: Actuator | None = None,
                 metrics_source: MetricsSource | None = None, learner: Learner | None = None,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.store = store
        self.actuator: Actuator = actuator or UnavailableActuator()
        self.metrics_source = metrics_source
        self.learner: Learner = learner or make_learner(policy.config.learner, clock=clock)
        self.clock = clock
        self.replica_id = store.replica_id
        self.guards = Guardrails(policy, store, clock)
        self.metrics = MitigationMetrics(registry or CollectorRegistry(), self)
        self.task: asyncio.Task[None] | None = None  # run_forever, when started by the app
        self._thread: threading.Thread | None = None  # start(): the worker's own loop and thread
        # True while the foreground (the receiver's webhook intake) is busy: the background loop
        # then paces itself (see _fill). None: never paced.
        self.foreground_busy: Callable[[], bool] | None = None
        self._next_paced_start = 0.0
        self._pace_timer: asyncio.TimerHandle | None = None  # the paced loop's next look
        self._wake_pending = False  # a wake is scheduled on the worker's loop
        self._started_at: dict[asyncio.Task[None], float] = {}
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._decide_mutex = threading.Lock()
        self._learner_mutex = threading.Lock()
        # A learner rebuilt from the store already (make_learner(store=...)) goes on from there.
        self._learner_cursor = int(getattr(self.learner, "synced_through", 0) or 0)
        self._learner_synced = self._learner_cursor > 0
        known = getattr(self.learner, "invasiveness", None)
        if isinstance(known, dict):  # its costs, before the first decision (GET /learner)
            known.update({n: policy.strategy(n).invasiveness for n in policy.strategy_names()})
        self.learner_metrics = LearnerMetrics(self.metrics.registry, lambda: self.learner,
                                              self._learner_mutex)

    @property
    def wcfg(self) -> WorkerConfig:
        return self.policy.config.worker

    # --- the loop ----------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Tell the worker there is work (safe from any thread).

        Called after every group commit of the intake, so it must cost next to nothing: while
        a wake is already on its way, or the worker is paced and its timer will look anyway,
        it does nothing (every wake-up of the worker's thread is a moment the intake's threads
        wait for the GIL)."""
        if self._wake_pending or self._pace_timer is not None:
            return
        if self._wake is not None and self._loop is not None and not self._loop.is_closed():
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._on_wake)
            except RuntimeError:  # the loop closed meanwhile
                self._wake_pending = False

    def _on_wake(self) -> None:
        # Cleared before the event is set: a wake() after this line schedules another one, so
        # work committed after the worker looked is never missed.
        self._wake_pending = False
        if self._wake is not None:
            self._wake.set()

    def _pace_done(self) -> None:
        self._pace_timer = None
        if self._wake is not None:
            self._wake.set()

    async def run_forever(self) -> None:
        """The background worker: resumes what earlier runs left pending, then polls and wakes."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self._hold_while_busy()
        await asyncio.to_thread(self.sync_learner)
        while not self._stopping:
            self._wake.clear()  # before looking: a wake during _fill makes the next wait return
            try:
                await self._fill(paced=True)
            except Exception:  # noqa: BLE001 - the loop must survive a bad job or a store blip
                log.exception("mitigation worker error")
                self.metrics.worker_errors.inc()
            self.metrics.heartbeat.set(time.time())
            try:
                await asyncio.wait_for(self._wake.wait(), self.wcfg.poll_s)
            except asyncio.TimeoutError:
                pass

    async def _hold_while_busy(self) -> None:
        """A receiver that starts after an outage gets Alertmanager's retries of everything sent
        meanwhile, within a second or two. Measured on 2 cores: with the worker resuming its
        backlog (learner sync, then paced jobs) from the first moment, the first ~25 webhooks after
        the restart took 1-30 ms each instead of 0.4-0.9; the jobs are durable and can wait. So the
        worker starts once no webhook came for ``busy_window_s``, or after ``start_hold_s``."""
        if self.foreground_busy is None:
            return
        deadline = time.monotonic() + self.wcfg.start_hold_s
        while not self._stopping and time.monotonic() < deadline and self.foreground_busy():
            await asyncio.sleep(0.05)

    def warm_up(self) -> None:
        """One-time costs of the actuator and the metrics source (their optional ``warm_up``:
        imports, the CA bundle; ~0.1 s of CPU), paid by :meth:`start` before the first job rather
        than inside one."""
        for part in (self.actuator, self.metrics_source):
            warm = getattr(part, "warm_up", None)
            if callable(warm):
                try:
                    warm()
                except Exception:  # noqa: BLE001 - a cold start is slower, not broken
                    log.warning("warm-up of %s failed", type(part).__name__, exc_info=True)

    def start(self) -> None:
        """Run :meth:`run_forever` on an event loop of its own, in a thread of its own.

        The receiver's HTTP event loop then only answers webhooks: nothing the worker does
        (metrics scrapes and actions through HTTP clients whose set-up alone costs tens of ms
        of CPU, verification, database calls) can hold up a POST. Stop with :meth:`shutdown`.

        It warms up first, on the caller's thread: the receiver starts the worker before uvicorn
        listens, so those ~0.1 s of CPU (~30 ms of it one C call that holds the GIL) stall no
        webhook. Paid later on the worker's thread, at the end of its start hold, they put 10-40
        of 4,000 alerts over 20 ms in every run of benchmarks/receiver_load.py."""
        if self._thread is not None:
            return
        self.warm_up()
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            # Few threads for its blocking calls: each is one more contender for the GIL the
            # webhook intake needs; the decision lock serialises most of the work anyway.
            loop.set_default_executor(ThreadPoolExecutor(max_workers=2,
                                                         thread_name_prefix="mitigation-worker-io"))
            self._thread_loop = loop
            self.task = loop.create_task(self.run_forever(), name="mitigation-worker")
            ready.set()
            try:
                loop.run_forever()
            finally:
                try:
                    left = asyncio.all_tasks(loop)
                    for t in left:
                        t.cancel()
                    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                    loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    loop.close()

        self._thread = threading.Thread(target=main, name="mitigation-worker", daemon=True)
        self._thread.start()
        ready.wait()

    def status(self) -> str:
        """'disabled' (never started), 'running', or 'stopped' (its loop ended or crashed)."""
        if self.task is None:
            return "disabled"
        if self._thread is not None and not self._thread.is_alive():
            return "stopped"
        return "stopped" if self.task.done() else "running"

    async def drain(self) -> int:
        """Process every job that can be claimed now, to completion (tests, one-shot runs)."""
        await asyncio.to_thread(self.sync_learner)
        done = 0
        while True:
            done += await self._fill()
            if not self._tasks:
                return done
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop taking jobs, give running ones ``grace_s`` to finish, hand back the rest."""
        thread, loop = self._thread, self._thread_loop
        if thread is not None and loop is not None and threading.current_thread() is not thread:
            # Started with start(): shut down on the worker's own loop, then end its thread.
            if thread.is_alive() and not loop.is_closed():
                try:
                    fut = asyncio.run_coroutine_threadsafe(self._shutdown(grace_s), loop)
                    await asyncio.wrap_future(fut)
                except RuntimeError:  # its loop stopped meanwhile
                    pass
                finally:
                    try:
                        loop.call_soon_threadsafe(loop.stop)
                    except RuntimeError:
                        pass
            await asyncio.to_thread(thread.join, grace_s + 10.0)
            return
        await self._shutdown(grace_s)

    async def _shutdown(self, grace_s: float) -> None:
        self._stopping = True
        self.wake()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _fill(self, paced: bool = False) -> int:
        """Start jobs up to the concurrency limit. ``paced`` (the background loop): while the
        foreground is busy (``foreground_busy``: webhooks arriving), one job at a time, each
        followed by a pause, so that the worker takes at most ``worker.busy_share`` of the time."""
        started = 0
        while not self._stopping:
            busy = paced and self.foreground_busy is not None and self.foreground_busy()
            if len(self._tasks) >= (1 if busy else self.wcfg.concurrency):
                break
            if busy:
                wait = self._next_paced_start - time.monotonic()
                if wait > 0:
                    if self._loop is not None and self._pace_timer is None:
                        # Looks again within a second even during a long pause: wakes are
                        # dropped while the timer is pending, and the storm may end sooner.
                        self._pace_timer = self._loop.call_later(min(wait, 1.0), self._pace_done)
                    break
            job = await asyncio.to_thread(self.store.claim_job, self.replica_id, self.wcfg.lease_s,
                                          self.clock())
            if job is None:
                break
            task = asyncio.create_task(self._process_job(job), name=f"mitigation-job-{job.id}")
            self._tasks.add(task)
            self._started_at[task] = time.monotonic()
            task.add_done_callback(self._task_done)
            started += 1
        return started

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        t0 = self._started_at.pop(task, None)
        if t0 is not None:
            took = time.monotonic() - t0
            share = self.wcfg.busy_share
            self._next_paced_start = time.monotonic() + took * (1.0 - share) / share
        if self._wake is not None:
            self._wake.set()

    async def _process_job(self, job: JobRecord) -> None:
        try:
            await self._process(job)
        except asyncio.CancelledError:
            # Shutting down: hand back what has not started, so a restart (or a peer) resumes it.
            await asyncio.shield(asyncio.to_thread(self._hand_back, job.id))
            raise
        except Exception:  # noqa: BLE001
            log.exception("job %s failed; it will be retried (attempt %d of %d)", job.id,
                          job.attempts, self.wcfg.max_attempts)
            self.metrics.worker_errors.inc()
            await asyncio.to_thread(self._hand_back, job.id)

    def _hand_back(self, job_id: int) -> None:
        j = self.store.job(job_id)
        if j is None or j.state is not JobState.RUNNING or j.owner != self.replica_id:
            return
        self.store.set_job_state(job_id, self.replica_id, JobState.PENDING, now=self.clock())

    def _job_owner_lock(self, job_id: int | None) -> str:
        # The job id in the name lets a successor free the lease of a runner that died.
        suffix = f"job{job_id}" if job_id is not None else uuid.uuid4().hex[:8]
        return f"{self.replica_id}#{suffix}"

    def _done(self, job_id: int, state: JobState = JobState.DONE, action_id: int | None = None) -> None:
        self.store.set_job_state(job_id, self.replica_id, state, action_id=action_id, now=self.clock())

    def count(self, strategy: str | None, outcome: Outcome | str) -> None:
        self.metrics.mitigations.labels(strategy or "none",
                                        outcome.value if isinstance(outcome, Outcome) else outcome).inc()

    def count_guards(self, decisions: list[GuardDecision]) -> None:
        """Guard checks as they are stored with an action (a deferred re-check is not counted)."""
        for d in decisions:
            self.metrics.guard_decisions.labels(d.guard, "allow" if d.ok else "deny").inc()

    async def _process(self, job: JobRecord) -> None:
        alert = await asyncio.to_thread(self.store.alert, job.alert_id)
        if alert is None:  # pragma: no cover - foreign key makes this impossible
            await asyncio.to_thread(self._done, job.id)
            return
        if job.action_id is not None:
            done = await asyncio.to_thread(self._resume_existing, job)
            if done:
                return
            action = await asyncio.to_thread(self.store.action, job.action_id)
            if action is not None and action.status == "approved":
                await self._run_approved(job, alert, action.id, action.strategy)  # type: ignore[arg-type]
                return
        if job.attempts > self.wcfg.max_attempts:
            await asyncio.to_thread(self._give_up, job, alert)
            return
        await self._decide_and_run(job, alert)

    def _resume_existing(self, job: JobRecord) -> bool:
        """A job that already has an action (approval, restart). True when nothing is left to do."""
        assert job.action_id is not None
        ev = self.store.action_events(job.action_id)
        action = self.store.action(job.action_id)
        if "finished" in ev:
            self._done(job.id)
            return True
        if "started" in ev:
            # Its runner died mid-action. Re-running something that may have half-happened is
            # how automation makes incidents worse: record it, let the learner see a failure.
            detail = "the receiver stopped while this action ran; it is not re-run"
            if self.store.finish_action(job.action_id, Outcome.INTERRUPTED, detail=detail,
                                        now=self.clock()):
                self.count(action.strategy if action else None, Outcome.INTERRUPTED)
            # Free the dead runner's hold on the target (its lease names this job).
            if action is not None and action.target:
                name = self.guards.target_lock(action.target)
                holder = self.store.lock_holder(name, now=self.clock())
                if holder is not None and holder.endswith(f"#job{job.id}"):
                    self.store.release_lock(name, holder)
            self._done(job.id)
            return True
        if "approved" in ev:
            return False
        if action is not None and action.mode == Mode.APPROVAL.value:
            self._done(job.id, JobState.WAITING_APPROVAL)
            return True
        # Decided but never started (stopped in between): supersede it and decide afresh.
        if self.store.finish_action(job.action_id, Outcome.SKIPPED, now=self.clock(),
                                    detail="superseded: the receiver stopped before it ran"):
            self.count(action.strategy if action else None, Outcome.SKIPPED)
        return False

    def _give_up(self, job: JobRecord, alert: AlertRecord) -> None:
        why = f"gave up after {job.attempts - 1} attempts (receiver errors; see its log)"
        aid = self.store.create_action(alert_id=alert.id, job_id=job.id, strategy=None,
                                       target=alert.instance, mode="none", why=why, now=self.clock())
        self.store.finish_action(aid, Outcome.SKIPPED, detail=why, now=self.clock())
        self.count(None, Outcome.SKIPPED)
        self._done(job.id)

    # --- deciding ------------------------------------------------------------------------------------------

    @staticmethod
    def _state(alert: AlertRecord) -> dict[str, Any]:
        return {"alertname": alert.alertname, "failure_type": alert.failure_type,
                "severity": alert.severity, "target": alert.instance, "labels": dict(alert.labels)}

    async def _snapshot(self, target: Target | None) -> MetricsSnapshot | None:
        if self.metrics_source is None or target is None:
            return None
        try:
            return await asyncio.wait_for(self.metrics_source.snapshot(target), 15.0)
        except Exception as e:  # noqa: BLE001 - unreadable metrics are stale data, not a crash
            log.warning("metrics for %s unavailable: %s", target.instance, redact_text(e))
            return None

    async def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (sync, in a thread) holding the store's decision lease: guard checks and the
        'started' record of one decision are atomic across replicas (rate limit, cooldown)."""
        owner = f"{self.replica_id}#{uuid.uuid4().hex[:8]}"

        def call() -> Any:
            with self._decide_mutex:
                if not self.store.acquire_lock(_DECIDE_LOCK, owner, 30.0, now=self.clock()):
                    return _NOT_LOCKED
                try:
                    return fn(*args)
                finally:
                    self.store.release_lock(_DECIDE_LOCK, owner)

        for _ in range(300):
            got = await asyncio.to_thread(call)
            if got is not _NOT_LOCKED:
                return got
            await asyncio.sleep(0.05)
        raise TimeoutError("the decision lock stayed taken for 15 s")

    async def _decide_and_run(self, job: JobRecord, alert: AlertRecord) -> None:
        target = self.policy.target(alert.instance)
        snap = await self._snapshot(target)
        errors = await asyncio.to_thread(self.store.recent_errors, alert.instance,
                                         since=self.clock() - 3600.0)
        await asyncio.to_thread(self.sync_learner)
        plan: _Plan = await self._locked(self._decide, job, alert, target, snap, errors)
        for reason, detail in plan.escalations:
            await self._escalate(alert, target, reason, detail, snap, errors)
        if plan.execute:
            await self._run_action(plan, job.id)

    def _decide(self, job: JobRecord, alert: AlertRecord, target: Target | None,
                snap: MetricsSnapshot | None, errors: list[str]) -> _Plan:
        g = self.guards
        now = self.clock()
        state = self._state(alert)
        metrics = dict(snap.values) if snap else {}
        decisions: list[GuardDecision] = []

        def stop(outcome: Outcome, why: str, escalate: tuple[str, str] | None = None) -> _Plan:
            """No strategy runs: record why (with every guard decision so far) and finish."""
            aid = self.store.create_action(
                alert_id=alert.id, job_id=job.id, strategy=None, target=alert.instance, mode="none",
                why=why, guards=[d.model_dump() for d in decisions], state=state, errors=errors,
                metrics_before=metrics, now=now)
            self.store.finish_action(aid, outcome, detail=why, now=now)
            self.count(None, outcome)
            self.count_guards(decisions)
            self._done(job.id, action_id=aid)
            return _Plan(action_id=aid, escalations=[escalate] if escalate else [])

        # 1. Checks that stop everything.
        d = g.kill_switch()
        decisions.append(d)
        if not d.ok:
            return stop(Outcome.BLOCKED, f"kill switch: {d.detail}")
        if job.cancel_requested:
            return stop(Outcome.CANCELLED, "the alert resolved before any action")
        for d in (g.alert_fresh(alert), g.metrics_fresh(snap.at if snap else None,
                                                        self.metrics_source is not None)):
            decisions.append(d)
            if not d.ok:
                return stop(Outcome.BLOCKED, f"stale data: {d.detail}", ("stale_data", d.detail))
        d = g.blast_radius()
        decisions.append(d)
        if not d.ok:
            return stop(Outcome.BLOCKED, f"blast radius: {d.detail}", ("blast_radius", d.detail))

        # 2. Candidates, each through its own guards and precondition.
        candidates = self.policy.candidates(alert.alertname, alert.labels) or []
        if not candidates:
            return stop(Outcome.SKIPPED, "the matching policy rule lists no strategies (record only)")
        available: list[Strategy] = []
        base_ctx = StrategyContext(alert=alert, target=target, mode=Mode.AUTO, state=state,
                                   errors=list(errors), metrics_before=metrics,
                                   metrics_at=snap.at if snap else None,
                                   metrics_source=self.metrics_source)
        allowed = g.target_allowed(alert.instance)
        for name in candidates:
            strat = self.policy.strategy(name)
            checks = [g.mode_allows(name)]
            if strat.needs_target:
                checks.append(allowed.model_copy(update={"strategy": name}))
            checks += [g.circuit_guard(name), g.cooldown(name, alert.instance)]
            for c in checks:
                decisions.append(c)
                if not c.ok:
                    break
            else:
                pre = self._precondition(strat, base_ctx)
                decisions.append(GuardDecision(guard="precondition", ok=pre.ok, detail=pre.reason,
                                               strategy=name))
                if pre.ok:
                    available.append(strat)
        if not available:
            failed = [d for d in decisions if not d.ok]
            only_pre = all(d.guard in ("precondition", "mode") for d in failed)
            summary = "; ".join(f"{d.strategy}: {d.guard} ({d.detail})" for d in failed)
            if (snap is not None and snap.values.get("up", 1.0) >= 1.0
                    and any(d.guard == "precondition" for d in failed) and only_pre
                    and job.rechecks < self.wcfg.precondition_rechecks):
                # The alert fired because its condition held for the rule's hold time; one
                # snapshot where the pressure eased (a burst ended, a scrape in between) is not a
                # reason to drop it. Look again later; a resolve cancels the job meanwhile. Only
                # with live metrics of a target that answers: otherwise a re-check learns nothing.
                when = now + self.wcfg.precondition_recheck_s
                if self.store.defer_job(job.id, self.replica_id, when, now=now):
                    log.info("alert %d (%s on %s): no precondition holds now (%s); re-check %d/%d in "
                             "%.0f s", alert.id, alert.alertname, alert.instance, redact_text(summary),
                             job.rechecks + 1, self.wcfg.precondition_rechecks,
                             self.wcfg.precondition_recheck_s)
                    return _Plan()  # the worker's poll (worker.poll_s) picks it up when due
            rechecked = f" (after {job.rechecks} re-checks)" if job.rechecks else ""
            return stop(Outcome.SKIPPED if only_pre else Outcome.BLOCKED,
                        f"no candidate strategy may run{rechecked}: {summary}")

        # 3. The learner picks.
        with self._learner_mutex:
            name, confidence = self.learner.select_best_strategy(state, errors, metrics, available)
            reason = getattr(self.learner, "last_reason", "")
        if name is None:
            why = f"learner chose none of {[s.name for s in available]}: {reason}"
            return stop(Outcome.SKIPPED, why, ("exhausted", why))
        if name not in {s.name for s in available}:
            return stop(Outcome.SKIPPED, f"learner chose {name!r}, which is not available")
        self.learner_metrics.selected(state, name)
        strat = self.policy.strategy(name)
        mode = self.policy.mode(name)
        why = (f"{alert.alertname} on {alert.instance}: {type(self.learner).__name__} chose {name} "
               f"(invasiveness {strat.invasiveness}, confidence {confidence:.2f}) among "
               f"{[s.name for s in available]}" + (f": {reason}" if reason else ""))
        threshold = self.policy.config.learner.confidence_threshold
        if mode is Mode.AUTO and threshold is not None and confidence < threshold:
            mode = Mode.APPROVAL
            why += f"; confidence below learner.confidence_threshold ({threshold:.2f}): approval needed"
        params = strat.params.model_dump(mode="json")
        ctx = dataclasses.replace(base_ctx, mode=mode, why=why)

        if mode is Mode.DRY_RUN:
            aid = self.store.create_action(
                alert_id=alert.id, job_id=job.id, strategy=name, target=alert.instance,
                mode=mode.value, why=why, confidence=confidence, params=params,
                guards=[d.model_dump() for d in decisions], state=state, errors=errors,
                metrics_before=metrics, now=now)
            self.store.finish_action(aid, Outcome.DRY_RUN, now=now,
                                     detail=f"dry-run: would run {name} with {params}")
            self.count(name, Outcome.DRY_RUN)
            self.count_guards(decisions)
            self._done(job.id, action_id=aid)
            return _Plan(action_id=aid)
        if mode is Mode.APPROVAL:
            aid = self.store.create_action(
                alert_id=alert.id, job_id=job.id, strategy=name, target=alert.instance,
                mode=mode.value, why=why, confidence=confidence, params=params,
                guards=[d.model_dump() for d in decisions], state=state, errors=errors,
                metrics_before=metrics, now=now)
            self.count_guards(decisions)
            self._done(job.id, JobState.WAITING_APPROVAL, action_id=aid)
            log.info("action %d (%s on %s) awaits approval: POST /actions/%d/approve", aid, name,
                     alert.instance, aid)
            return _Plan(action_id=aid)

        # 4. Auto: the checks that stop the chosen action, then 'started', all under the lock.
        return self._start(job, alert, name, ctx, decisions, confidence=confidence, why=why,
                           params=params, state=state, errors=errors, metrics=metrics)

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

    # --- acting --------------------------------------------------------------------------------------------

    async def _run_action(self, plan: _Plan, job_id: int | None) -> None:
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

    # --- learner -------------------------------------------------------------------------------------------

    def sync_learner(self) -> int:
        """Feed the learner every outcome it has not seen (its own, other replicas', earlier runs)."""
        n = 0
        with self._learner_mutex:
            since = None if self._learner_synced else self.clock() - self.wcfg.learner_history_s
            while True:
                batch = self.store.outcomes(after_id=self._learner_cursor, since=since, limit=1000)
                for o in batch:
                    try:
                        self.learner.record_outcome(o.state, o.errors, o.metrics, o.strategy, o.outcome,
                                                    metrics_after=o.metrics_after,
                                                    duration_s=o.duration_s, at=o.at)
                    except Exception:  # noqa: BLE001 - a learner bug must not stop mitigation
                        log.exception("learner rejected outcome %d", o.id)
                    self.learner_metrics.outcome(o.state, o.strategy, o.outcome)
                    self._learner_cursor = o.id
                    n += 1
                if len(batch) < 1000:
                    break
            self._learner_synced = True
        return n
