"""The mitigation receiver: Alertmanager webhooks in, guarded and verified actions out.

POST /webhook persists every alert of the notification (dedupe key fingerprint + startsAt) and
answers 202 before any work runs; the background :class:`~vllm_otel.mitigate.worker.Worker` then
takes jobs from the store, asks the guards and the learner, runs the chosen strategy through the
actuator, verifies it, and records the outcome (which the learner reads back from the store).
Because the work queue lives in the store, a restarted receiver resumes pending work and several
replicas can share one PostgreSQL. Operators approve, reject and stop actions over HTTP here (and
on the /ui page), each with their own credential; the intake token only delivers webhooks.

Only 5xx answers make Alertmanager retry, so: 400 for payloads that will never be valid, 401/403
for auth, 413 for oversize bodies, 503 when the store is down (retry is right then).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import asynccontextmanager, nullcontext
from typing import Any, AsyncIterator, Callable, ContextManager, Mapping, Sequence

from prometheus_client import CollectorRegistry
# Starlette, not FastAPI: eleven small routes need no dependency injection or OpenAPI, and FastAPI's
# import (~170 ms here) lengthened every restart, during which Alertmanager's retries pile up.
from starlette.applications import Starlette
from starlette.routing import Route

from vllm_otel.learn.learner import Learner
from vllm_otel.mitigate.records import AlertmanagerWebhook, AlertStatus, JobState, Outcome
from vllm_otel.mitigate.policy import Policy
from vllm_otel.mitigate.routes import api_routes
from vllm_otel.mitigate.routes.intake import webhook_asgi
from vllm_otel.mitigate.serve_auth import Credentials
from vllm_otel.mitigate.strategies import Actuator, MetricsSource
from vllm_otel.mitigate.worker import MitigationMetrics, Worker
from vllm_otel.redact import redact_text
from vllm_otel.mitigate.store import Notification, NotificationResult, Store, WriteWouldWait

__all__ = ["Receiver", "GroupCommit", "IntakeGate", "create_app", "DEFAULT_MAX_BODY_BYTES", "MitigationMetrics"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # a full group of 1,000 alerts is ~700 kB


class IntakeGate:
    """Webhooks in flight; background database work waits for a moment without any.

    The worker shares this process (and its GIL) with the intake. Before each of its database
    calls it waits until no webhook is being handled, at most ``max_wait_s``: under a steady
    alert stream it runs in the gaps between requests; under a storm that leaves no gaps it
    still makes progress (one call per ``max_wait_s``) while the intake keeps its latency.
    """

    def __init__(self, max_wait_s: float = 0.05, busy_window_s: float = 1.0) -> None:
        self.max_wait_s = max_wait_s
        self.busy_window_s = busy_window_s
        self._cond = threading.Condition(threading.Lock())
        self._inflight = 0
        # When a webhook was last seen (monotonic). Starting "busy": a receiver that starts after
        # an outage gets Alertmanager's retries all at once, and they come first.
        self._last = time.monotonic()

    def enter(self) -> None:
        with self._cond:
            self._inflight += 1
            self._last = time.monotonic()

    def leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._last = time.monotonic()
            if self._inflight <= 0:
                self._inflight = 0
                self._cond.notify_all()

    def alone(self) -> bool:
        """At most one webhook in flight (the caller's own): no burst to batch."""
        return self._inflight <= 1

    def busy(self) -> bool:
        """Webhooks in flight now, or one ended less than ``busy_window_s`` ago."""
        return self._inflight > 0 or time.monotonic() - self._last < self.busy_window_s

    def wait_idle(self) -> None:
        with self._cond:
            if self._inflight:
                self._cond.wait_for(lambda: self._inflight == 0, timeout=self.max_wait_s)


class GroupCommit:
    """Group commit for the webhook intake: one writer thread stores, in ONE transaction, every
    notification that arrived while its previous commit ran, then answers each of them.

    Durable before 202 still holds alert by alert: a request's future resolves only after the
    transaction holding its notification committed. Under load many requests share one commit
    (and one fsync where the database does one), and the event loop never waits on the database;
    when idle a batch is one notification and the latency is one commit's.

    ``inline``: where a commit is cheap (SQLite in WAL without an fsync per commit, ~0.1 ms), a
    notification is stored on the event loop's own thread whenever ``inline()`` says the write
    lock is free this instant, and the writer thread only takes what arrives while it is not. That
    saves two thread hand-overs and a wake-up of the loop per webhook, which cost more than the
    commit: measured side by side at 200 alerts/s, the receiver's own p99 went from 17-37 ms to
    7-8 ms and its CPU per alert down 12 % (benchmarks/README.md).
    """

    def __init__(self, store_many: Callable[[list[Any]], list[Any]], *, max_batch: int = 256,
                 after_batch: Callable[[], None] | None = None,
                 thread_init: Callable[[], None] | None = None,
                 inline: Callable[[], ContextManager[bool]] | None = None) -> None:
        self._store_many = store_many
        self._after_batch = after_batch
        self._thread_init = thread_init
        self._inline = inline
        self.inline_commits = 0
        self.max_batch = max_batch
        self._q: queue.SimpleQueue[tuple[Any, asyncio.AbstractEventLoop, asyncio.Future[Any]] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    async def submit(self, item: Any, *, inline_ok: bool = True) -> Any:
        """Store ``item`` with the next batch; its result, or the exception that kept it out.
        ``inline_ok`` False: never on the caller's thread (a large notification)."""
        if inline_ok and self._inline is not None and self._q.empty():  # nothing queued to overtake
            with self._inline() as free:
                if free:
                    if self._thread_init is not None:
                        self._thread_init()
                    try:
                        got = self._store_many([item])[0]
                    except Exception as e:  # noqa: BLE001 - as on the writer thread
                        got = e
            if free and not isinstance(got, WriteWouldWait):  # else: the writer thread waits
                self.inline_commits += 1
                self._run_after_batch()
                if isinstance(got, BaseException):
                    raise got
                return got
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="receiver-group-commit",
                                                    daemon=True)
                    self._thread.start()
        self._q.put((item, loop, fut))
        return await fut

    def close(self, timeout_s: float = 10.0) -> None:
        """Store what is queued, then stop the writer thread (it restarts on the next submit)."""
        t = self._thread
        if t is not None and t.is_alive():
            self._q.put(None)
            t.join(timeout_s)

    def _run(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        while True:
            first = self._q.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                results: list[Any] = list(self._store_many([item for item, _, _ in batch]))
                if len(results) != len(batch):  # pragma: no cover - a bug, not an outage
                    raise RuntimeError(f"{len(results)} results for {len(batch)} notifications")
            except Exception as e:  # noqa: BLE001 - the writer must outlive any failure
                results = [e] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
            for (_, loop, fut), res in zip(batch, results):
                by_loop.setdefault(loop, []).append((fut, res))
            for loop, done in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve_all, done)
                except RuntimeError:  # its loop closed meanwhile: nobody waits for the answer
                    pass
            self._run_after_batch()
            if stop:
                return

    def _run_after_batch(self) -> None:
        if self._after_batch is not None:
            try:
                self._after_batch()
            except Exception:  # noqa: BLE001
                log.exception("after-batch hook failed")


def _resolve_all(done: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for fut, res in done:
        if fut.done():  # the request was cancelled (client went away); it is stored regardless
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


class Receiver:
    """The receiving side: ingest notifications, operator actions; the :class:`Worker` acts."""

    def __init__(self, policy: Policy, store: Store, *, actuator: Actuator | None = None,
                 metrics_source: MetricsSource | None = None, learner: Learner | None = None,
                 credentials: Credentials | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.store = store
        self.credentials = credentials or Credentials()
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.worker = Worker(policy, store, actuator=actuator, metrics_source=metrics_source,
                             learner=learner, registry=registry, clock=clock)
        self.metrics = self.worker.metrics
        self.replica_id = store.replica_id
        # The webhook intake: group commit on one writer thread; wakes the worker per batch.
        # Its database calls come first: the worker's wait for a gap between webhooks.
        self.intake_gate = IntakeGate()
        gate = self.intake_gate

        def inline() -> ContextManager[bool]:
            # Inline only for a webhook on its own: a burst (Alertmanager's retries after a
            # restart, hundreds at once) goes to the writer thread, whose commits then take many
            # notifications each and run beside the loop's parsing instead of after it.
            return store.write_now() if gate.alone() else nullcontext(False)

        self.intake = GroupCommit(self.ingest_many, after_batch=self.wake,
                                  thread_init=store.mark_foreground_thread, inline=inline)
        store.background_gate = self.intake_gate.wait_idle
        self.worker.foreground_busy = self.intake_gate.busy

    @property
    def learner(self) -> Learner:
        return self.worker.learner

    def wake(self) -> None:
        self.worker.wake()

    async def drain(self) -> int:
        """Process every job that can be claimed now, to completion (tests, one-shot runs)."""
        return await self.worker.drain()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        await asyncio.to_thread(self.intake.close)
        await self.worker.shutdown(grace_s)

    def sync_learner(self) -> int:
        return self.worker.sync_learner()

    # --- ingest ---------------------------------------------------------------------------------------------

    def ingest(self, hook: AlertmanagerWebhook) -> dict[str, int]:
        """Persist a notification alert by alert (sync); returns counts for the 202 body."""
        got = self.ingest_many([hook])[0]
        if isinstance(got, BaseException):
            raise got
        return got

    def ingest_many(self, hooks: Sequence[AlertmanagerWebhook]) -> list[dict[str, int] | Exception]:
        """Persist several notifications in one transaction (group commit); per notification its
        counts, or the exception that kept it from being stored (then nothing of it was).

        If the shared transaction fails (a bad row, a deadlock with a peer replica), each
        notification is retried alone, so one cannot make the others fail."""
        now = self.clock()
        notes = [self._notification(h, now) for h in hooks]
        try:
            stored: list[NotificationResult | Exception] = list(self.store.ingest(notes))
        except Exception as e:  # noqa: BLE001
            if len(notes) == 1:
                return [e]
            log.warning("group commit of %d notifications failed (%s); storing them one by one",
                        len(notes), type(e).__name__)
            stored = []
            for n in notes:
                try:
                    stored.append(self.store.ingest([n])[0])
                except Exception as e1:  # noqa: BLE001
                    stored.append(e1)
        return [r if isinstance(r, Exception) else self._counted(h, n, r)
                for h, n, r in zip(hooks, notes, stored)]

    def _notification(self, hook: AlertmanagerWebhook, now: float) -> Notification:
        cfg = self.policy.config
        unmapped: list[str | None] = []
        for a in hook.alerts:
            if a.status is AlertStatus.FIRING and self.policy.candidates(a.alertname, a.labels) is None:
                unmapped.append(f"no policy rule matches alertname={a.alertname!r}"
                                + (f" {cfg.failure_type_label}={a.labels[cfg.failure_type_label]!r}"
                                   if cfg.failure_type_label in a.labels else ""))
            else:
                unmapped.append(None)
        return Notification(hook=hook, received_at=now, unmapped=tuple(unmapped),
                            target_label=cfg.target_label, failure_type_label=cfg.failure_type_label)

    def _counted(self, hook: AlertmanagerWebhook, note: Notification,
                 stored: NotificationResult) -> dict[str, int]:
        """Metrics, log and the 202 body of a stored notification."""
        if hook.truncated_alerts:
            # Alertmanager's max_alerts cut the group: those alerts never reach us; say so loudly.
            log.warning("notification for %s left out %d alerts (truncatedAlerts); raise max_alerts",
                        redact_text(hook.group_key), hook.truncated_alerts)
            self.metrics.truncated.inc(hook.truncated_alerts)
        counts = {"alerts": len(hook.alerts), "new": 0, "duplicate": 0, "unmapped": 0,
                  "resolved": 0, "cancelled": 0}
        for a, unmapped, res in zip(hook.alerts, note.unmapped, stored.alerts):
            if a.status is AlertStatus.FIRING:
                if not res.new:
                    counts["duplicate"] += 1
                    result = "duplicate"
                elif unmapped is not None:
                    counts["unmapped"] += 1
                    result = "unmapped"
                    self.metrics.mitigations.labels("none", Outcome.UNMAPPED.value).inc()
                else:
                    counts["new"] += 1
                    result = "new"
                self.metrics.alerts.labels("firing", result).inc()
            else:
                counts["resolved"] += int(res.resolved_now)
                counts["cancelled"] += res.cancelled_jobs
                for strat in res.cancelled_actions:
                    self.metrics.mitigations.labels(strat or "none", Outcome.CANCELLED.value).inc()
                self.metrics.alerts.labels("resolved", "new" if res.resolved_now else "duplicate").inc()
        return counts


    # --- operator actions ---------------------------------------------------------------------------------

    def approve(self, action_id: int, by: str, comment: str = "") -> tuple[int, dict[str, Any]]:
        action = self.store.action(action_id)
        if action is None:
            return 404, {"detail": f"no action {action_id}"}
        if action.status != "awaiting_approval":
            return 409, {"detail": f"action {action_id} is {action.status}, not awaiting approval",
                         "status": action.status, "outcome": action.outcome}
        if not self.store.add_action_event(action_id, "approved", {"by": by, "comment": comment},
                                           now=self.clock()):
            return 409, {"detail": f"action {action_id} was already approved"}
        job = self.store.job_for_alert(action.alert_id) if action.alert_id is not None else None
        if job is not None:
            self.store.transition_job(job.id, [JobState.WAITING_APPROVAL], JobState.PENDING,
                                      now=self.clock())
        self.wake()
        return 202, {"id": action_id, "status": "approved", "by": by}

    def reject(self, action_id: int, by: str, comment: str = "") -> tuple[int, dict[str, Any]]:
        action = self.store.action(action_id)
        if action is None:
            return 404, {"detail": f"no action {action_id}"}
        if action.status != "awaiting_approval":
            return 409, {"detail": f"action {action_id} is {action.status}, not awaiting approval"}
        if not self.store.finish_action(action_id, Outcome.REJECTED, now=self.clock(),
                                        detail=f"rejected by {by}" + (f": {comment}" if comment else "")):
            return 409, {"detail": f"action {action_id} already finished"}
        self.worker.count(action.strategy, Outcome.REJECTED)
        job = self.store.job_for_alert(action.alert_id) if action.alert_id is not None else None
        if job is not None:
            self.store.transition_job(job.id, [JobState.WAITING_APPROVAL], JobState.DONE,
                                      now=self.clock())
        return 200, {"id": action_id, "status": "finished", "outcome": Outcome.REJECTED.value}

    def set_kill_switch(self, engaged: bool, by: str, reason: str = "") -> dict[str, Any]:
        self.store.set_kill_switch(engaged, by=by, reason=reason, now=self.clock())
        log.warning("kill switch %s by %s", "ENGAGED" if engaged else "released", by)
        return self.kill_switch_state()

    def kill_switch_state(self) -> dict[str, Any]:
        if self.policy.config.kill_switch:
            return {"engaged": True, "source": "config", "reason": "kill_switch: true in the policy"}
        return self.store.kill_switch().model_dump()


# --- HTTP ---------------------------------------------------------------------------------------------

class _ReceiverApp(Starlette):
    """Starlette, except that POST /webhook goes straight to its handler: the one hot route skips
    the router and the exception middlewares (a storm multiplies every 0.1 ms of CPU a webhook
    costs). The handler answers every outcome itself; anything it did not
    expect still reaches uvicorn, which answers 500 and logs it."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/webhook" and scope["method"] == "POST":
            scope["app"] = self  # what Starlette sets; the handler finds the receiver through it
            await webhook_asgi(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    receiver: Receiver = app.state.receiver
    if app.state.start_worker:
        # Before uvicorn listens: the worker warms up first (Worker.start), then runs on its
        # own event loop and thread, and this loop only answers HTTP.
        receiver.worker.start()
    try:
        yield
    finally:
        await receiver.shutdown()
        if app.state.close_store:
            receiver.store.close()


def create_app(policy: Policy, store: Store, *, actuator: Actuator | None = None,
               metrics_source: MetricsSource | None = None, learner: Learner | None = None,
               token: str | None = None, operators: Mapping[str, str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time,
               start_worker: bool = True, close_store: bool = False, page: bool = True,
               secure_cookies: bool = False) -> Starlette:
    """The receiver's ASGI app; ``app.state.receiver`` is the :class:`Receiver`.

    ``token``: the intake token Alertmanager sends (webhooks only). ``operators``: name ->
    credential of the people who read the audit trail, approve, reject and hold the kill switch
    (see :class:`~vllm_otel.mitigate.serve_auth.Credentials`). Neither: no auth, loopback only.
    ``page``: serve the approvals page under /ui. ``secure_cookies``: its session cookie is
    HTTPS-only (set when serving TLS).
    ``start_worker``: False accepts and persists alerts without acting (tests, read-only replicas).
    The handlers are in :mod:`vllm_otel.mitigate.routes`.
    """
    creds = Credentials(token, operators)
    receiver = Receiver(policy, store, actuator=actuator, metrics_source=metrics_source,
                        learner=learner, credentials=creds, max_body_bytes=max_body_bytes,
                        registry=registry, clock=clock)
    ui: list[Route] = []
    state: Any = None
    if page:
        from vllm_otel.mitigate.approvals import PageState, approvals_routes

        ui, state = approvals_routes(), PageState(secure_cookies=secure_cookies)
    app = _ReceiverApp(lifespan=_lifespan, routes=[*ui, *api_routes()])
    app.state.receiver = receiver
    app.state.approvals = state
    app.state.start_worker = start_worker
    app.state.close_store = close_store
    return app
