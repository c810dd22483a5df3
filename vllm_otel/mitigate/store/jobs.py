"""The work queue: jobs claimed with a conditional UPDATE, deferred, moved between states."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import func, or_, select, update

from vllm_otel.mitigate.records import JobRecord, JobState
from vllm_otel.mitigate.store.schema import JobRow
from vllm_otel.mitigate.store.engine import StoreEngine

# The worker's writes on SQLite as plain SQL on the driver (a dry-run job took ~15 ms of CPU in store calls
# through the ORM, most of it SQLAlchemy's per-transaction cost: ~0.55 ms a session, ~0.2 ms a
# Core connection, ~0.02 ms the driver). Same rows as the ORM path, which PostgreSQL keeps
# (tests/integration/test_store.py runs its tests on both and compares the rows).
_JOB_COLS = ("id", "alert_id", "target", "state", "owner", "lease_until", "attempts", "action_id",
             "cancel_requested", "rechecks")
_CLAIMABLE_SQL = ("((state = ? AND (run_after IS NULL OR run_after <= ?))"
                  " OR (state = ? AND lease_until < ?))")
_RAW_CLAIMABLE_N = f"SELECT id FROM jobs WHERE {_CLAIMABLE_SQL} ORDER BY id LIMIT ?"
_RAW_CLAIM = ("UPDATE jobs SET state = ?, owner = ?, lease_until = ?, attempts = attempts + 1, "
              f"updated_at = ? WHERE id = ? AND {_CLAIMABLE_SQL} RETURNING {', '.join(_JOB_COLS)}")


@dataclass(frozen=True)
class _JobTuple:
    id: int
    alert_id: int
    target: str | None
    state: str
    owner: str | None
    lease_until: float | None
    attempts: int
    action_id: int | None
    cancel_requested: int
    rechecks: int | None


class JobStore(StoreEngine):
    """The work queue."""


    @staticmethod
    def _job_record(j: JobRow) -> JobRecord:
        return JobRecord(id=j.id, alert_id=j.alert_id, target=j.target, state=JobState(j.state),
                         owner=j.owner, lease_until=j.lease_until, attempts=j.attempts,
                         action_id=j.action_id, cancel_requested=bool(j.cancel_requested),
                         rechecks=j.rechecks or 0)

    def claim_job(self, owner: str, lease_s: float, now: float | None = None) -> JobRecord | None:
        """Take one pending job (or one whose runner's lease ran out) for ``owner``."""
        got = self.claim_jobs(owner, lease_s, now=now, limit=1)
        return got[0] if got else None

    def claim_jobs(self, owner: str, lease_s: float, *, now: float | None = None,
                   limit: int = 1) -> list[JobRecord]:
        """Take up to ``limit`` pending jobs (or ones whose runner's lease ran out) for ``owner``,
        oldest first, in one write transaction.

        The conditional UPDATE is the whole protocol: on PostgreSQL the second of two racing
        updates re-checks the WHERE clause after the first commits and matches nothing, so each
        job goes to one claimer; a claimer that loses every candidate looks once more.
        """
        now = time.time() if now is None else now
        scan = max(20, 2 * limit)
        if self.fast_worker:
            where = (JobState.PENDING.value, now, JobState.RUNNING.value, now)
            ids = [r[0] for r in self._raw_read(_RAW_CLAIMABLE_N, (*where, scan))]
            if not ids:
                return []
            out: list[JobRecord] = []
            with self._raw_write() as conn:
                for job_id in ids:
                    got = conn.execute(_RAW_CLAIM, (JobState.RUNNING.value, owner, now + lease_s, now,
                                                    job_id, *where)).fetchall()
                    if got:
                        out.append(self._job_record(_JobTuple(*got[0])))
                        if len(out) >= limit:
                            break
            return out
        due = or_(JobRow.run_after.is_(None), JobRow.run_after <= now)
        claimable = or_((JobRow.state == JobState.PENDING.value) & due,
                        (JobRow.state == JobState.RUNNING.value) & (JobRow.lease_until < now))
        with self._session() as s:
            ids = list(s.scalars(select(JobRow.id).where(claimable).order_by(JobRow.id).limit(scan)))
        if not ids:
            return []
        with self._write() as s:
            res = s.execute(update(JobRow).where(JobRow.id.in_(ids[:limit]), claimable).values(
                state=JobState.RUNNING.value, owner=owner, lease_until=now + lease_s,
                attempts=JobRow.attempts + 1, updated_at=now).returning(JobRow.id))
            won = sorted(r[0] for r in res)
            rows = s.scalars(select(JobRow).where(JobRow.id.in_(won)).order_by(JobRow.id)).all() if won else []
            claimed = [self._job_record(j) for j in rows]
        if not claimed and len(ids) > limit:  # another replica took these: the next ones
            return self.claim_jobs(owner, lease_s, now=now, limit=limit)
        return claimed

    def defer_job(self, job_id: int, owner: str, run_after: float, now: float | None = None) -> bool:
        """Hand a job its owner holds back as pending, not to be claimed before ``run_after``
        (its claim does not count as an attempt: attempts count runs that failed to finish)."""
        now = time.time() if now is None else now
        with self._write() as s:
            res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.owner == owner).values(
                state=JobState.PENDING.value, owner=None, lease_until=None, run_after=run_after,
                rechecks=JobRow.rechecks + 1, attempts=JobRow.attempts - 1, updated_at=now))
            return res.rowcount == 1

    def job(self, job_id: int) -> JobRecord | None:
        with self._session() as s:
            j = s.get(JobRow, job_id)
            return None if j is None else self._job_record(j)

    def job_for_alert(self, alert_id: int) -> JobRecord | None:
        with self._session() as s:
            j = s.scalar(select(JobRow).where(JobRow.alert_id == alert_id))
            return None if j is None else self._job_record(j)

    def set_job_state(self, job_id: int, owner: str, state: JobState, *,
                      action_id: int | None = None, now: float | None = None) -> bool:
        """Move a job its owner holds; False when someone else owns it now (lease lost)."""
        now = time.time() if now is None else now
        values: dict[str, Any] = {"state": state.value, "updated_at": now}
        if state is not JobState.RUNNING:
            values.update(owner=None, lease_until=None)
        if action_id is not None:
            values["action_id"] = action_id
        if self.fast_worker:
            with self._raw_write() as conn:
                n = conn.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in values)} "
                                 "WHERE id = ? AND owner = ? AND state = ?",
                                 (*values.values(), job_id, owner, JobState.RUNNING.value)).rowcount
            return n == 1
        with self._write() as s:
            res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.owner == owner,
                                                 JobRow.state == JobState.RUNNING.value)
                            .values(**values))
            return res.rowcount == 1

    def transition_job(self, job_id: int, from_states: Sequence[JobState], to_state: JobState,
                       now: float | None = None) -> bool:
        """Move a job not held by a runner (approval: waiting -> pending / done)."""
        now = time.time() if now is None else now
        with self._write() as s:
            res = s.execute(update(JobRow).where(JobRow.id == job_id,
                                                 JobRow.state.in_([f.value for f in from_states]))
                            .values(state=to_state.value, owner=None, lease_until=None, updated_at=now))
            return res.rowcount == 1

    def job_counts(self) -> dict[str, int]:
        with self._session() as s:
            rows = s.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        counts = {st.value: 0 for st in JobState}
        counts.update({state: n for state, n in rows})
        return counts
