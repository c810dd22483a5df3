"""What every part of the worker shares: its collaborators, the metrics and counters, the
targets' metrics reads, the learner's sync from the store."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from vllm_otel.learn import make_learner
from vllm_otel.learn.learner import Learner
from vllm_otel.learn.metrics import LearnerMetrics
from vllm_otel.mitigate.records import AlertRecord, GuardDecision, JobState, Outcome, Target
from vllm_otel.mitigate.policy import Guardrails, Policy, WorkerConfig
from vllm_otel.mitigate.strategies import (Actuator, MetricsSnapshot, MetricsSource, StrategyContext,
                                           UnavailableActuator)
from vllm_otel.redact import redact_text
from vllm_otel.mitigate.store import Store
from vllm_otel.mitigate.worker.metrics import MitigationMetrics

log = logging.getLogger(__name__)

_DECIDE_LOCK = "decide"

# Jobs of one target that read its metrics within this many seconds of each other share the read.
_SNAPSHOT_SHARE_S = 1.0


@dataclass
class _Plan:
    """What a decision leaves to do outside the decision lock."""

    action_id: int | None = None
    strategy: str | None = None
    ctx: StrategyContext | None = None
    execute: bool = False
    lock_owner: str | None = None
    escalations: list[tuple[str, str]] = field(default_factory=list)


class WorkerBase:
    """The worker's state and the helpers its parts share."""

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
        # Decisions wait here for the next batch (see _locked); _decider runs the batches.
        self._decisions: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._decider: asyncio.Task[None] | None = None
        self._acting: set[asyncio.Task[None]] = set()  # job tasks past their decision, running an action
        self._action_slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._progress: asyncio.Event | None = None  # drain()'s: a job finished or went on to act
        # One metrics read per target shared by the jobs that want it within _SNAPSHOT_SHARE_S.
        self._snaps: dict[str, tuple[float, asyncio.Future[MetricsSnapshot | None]]] = {}
        self._snaps_loop: asyncio.AbstractEventLoop | None = None
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

    @staticmethod
    def _state(alert: AlertRecord) -> dict[str, Any]:
        return {"alertname": alert.alertname, "failure_type": alert.failure_type,
                "severity": alert.severity, "target": alert.instance, "labels": dict(alert.labels)}

    async def _snapshot(self, target: Target | None) -> MetricsSnapshot | None:
        """The target's metrics; jobs of one target that ask within ``_SNAPSHOT_SHARE_S`` of each
        other share one read (a storm brings many alerts per target at once)."""
        if self.metrics_source is None or target is None:
            return None
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._snaps_loop is not loop:  # a future is bound to its loop (drain() may run on a new one)
            self._snaps, self._snaps_loop = {}, loop
        got = self._snaps.get(target.instance)
        if got is not None and now - got[0] <= _SNAPSHOT_SHARE_S:
            return await asyncio.shield(got[1])
        if len(self._snaps) > 4096:
            self._snaps = {k: v for k, v in self._snaps.items() if now - v[0] <= _SNAPSHOT_SHARE_S}
        fut = asyncio.ensure_future(self._read_snapshot(target))
        self._snaps[target.instance] = (now, fut)
        return await asyncio.shield(fut)

    async def _read_snapshot(self, target: Target) -> MetricsSnapshot | None:
        assert self.metrics_source is not None
        try:
            return await asyncio.wait_for(self.metrics_source.snapshot(target), 15.0)
        except Exception as e:  # noqa: BLE001 - unreadable metrics are stale data, not a crash
            log.warning("metrics for %s unavailable: %s", target.instance, redact_text(e))
            return None

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
