"""The worker's loop: jobs claimed in batches, paced while the intake is busy, resumed after a
restart, handed back on shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vllm_otel.mitigate.records import AlertRecord, JobRecord, JobState, Mode, Outcome
from vllm_otel.mitigate.worker.acting import Actor

log = logging.getLogger(__name__)

# While webhooks keep arriving, the background loop takes at most worker.busy_share of the wall
# time (default 0.15: one job at a time, then a pause of ~5.7x its duration). The worker shares the
# process, its GIL and, on small hosts, the CPUs with the intake: a storm of alerts must be stored
# first and quickly; the work queue is durable, so the jobs wait, and the worker catches up when
# the storm ends.


class Worker(Actor):
    """Claims jobs, decides with the guards and the learner, acts, verifies, records."""

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
        self._progress = progress = asyncio.Event()  # a job finished or went on to act: room to fill
        try:
            while True:
                progress.clear()
                done += await self._fill()
                if not self._tasks:
                    return done
                await progress.wait()
        finally:
            self._progress = None

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
        """Claim jobs and start them, up to ``worker.decide_batch`` deciding at once (their
        decisions are taken together, see :meth:`_locked`); a job that goes on to run an action
        no longer counts here (actions have their own limit, ``worker.concurrency``). ``paced``
        (the background loop): while the foreground is busy (``foreground_busy``: webhooks
        arriving), one job at a time, each followed by a pause, so that the worker takes at most
        ``worker.busy_share`` of the time."""
        started = 0
        while not self._stopping:
            busy = paced and self.foreground_busy is not None and self.foreground_busy()
            room = (1 if busy else self.wcfg.decide_batch) - (len(self._tasks) - len(self._acting))
            if room <= 0:
                break
            if busy:
                wait = self._next_paced_start - time.monotonic()
                if wait > 0:
                    if self._loop is not None and self._pace_timer is None:
                        # Looks again within a second even during a long pause: wakes are
                        # dropped while the timer is pending, and the storm may end sooner.
                        self._pace_timer = self._loop.call_later(min(wait, 1.0), self._pace_done)
                    break
            jobs = await asyncio.to_thread(self.store.claim_jobs, self.replica_id, self.wcfg.lease_s,
                                           now=self.clock(), limit=room)
            for job in jobs:
                task = asyncio.create_task(self._process_job(job), name=f"mitigation-job-{job.id}")
                self._tasks.add(task)
                self._started_at[task] = time.monotonic()
                task.add_done_callback(self._task_done)
            started += len(jobs)
            if len(jobs) < room:
                break
        return started

    def _pace(self, t0: float) -> None:
        took = time.monotonic() - t0
        share = self.wcfg.busy_share
        self._next_paced_start = time.monotonic() + took * (1.0 - share) / share

    def _now_acting(self) -> None:
        """The current job task has decided and runs an action now: it leaves the deciding pool
        (the pace counts its decision only; verification may take minutes)."""
        task = asyncio.current_task()
        if task is None or task not in self._tasks:
            return
        self._acting.add(task)  # type: ignore[arg-type]
        t0 = self._started_at.pop(task, None)  # type: ignore[arg-type]
        if t0 is not None:
            self._pace(t0)
        for ev in (self._wake, self._progress):
            if ev is not None:
                ev.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._acting.discard(task)
        t0 = self._started_at.pop(task, None)
        if t0 is not None:
            self._pace(t0)
        for ev in (self._wake, self._progress):
            if ev is not None:
                ev.set()

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
