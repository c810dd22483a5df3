"""Durable state of the mitigation loop: alerts, the audit trail, outcomes, dedupe keys, leases.

:class:`Store` is the one door into the database; its parts live by responsibility in
``schema`` (tables), ``engine`` (connections and transactions, both databases), ``sqlite``
(SQLite pragmas, WAL checkpoints, the no-wait path), ``alerts`` (webhooks, alerts: the intake),
``jobs`` (the work queue), ``actions`` (decisions, their events and outcome rows),
``outcomes`` (what the guards and the learner read) and ``leases`` (named leases).

SQLAlchemy 2 ORM; SQLite by default (one receiver), PostgreSQL when several receiver replicas share
the work. Two kinds of tables:

* audit tables (webhooks, alerts, alert_resolutions, actions, action_events, outcomes,
  kill_switch_events) are insert-only: this class offers no way to update or delete them. What
  happens to an action later (approval, start, finish) is a new ``action_events`` row, unique per
  (action, kind), so two replicas can never both start or both finish the same action;
* coordination tables (jobs, locks, alert_activity) are mutable by nature: a work queue claimed
  with a conditional UPDATE, named leases, and when an alert was last seen.

Dedupe keys (fingerprint + startsAt) are unique-constrained, so the same alert delivered to two
replicas at once creates one alert and one job. Secrets never reach a row: labels, annotations,
params and free text are redacted here, at the one door into the database.

Times are unix seconds (floats) everywhere: portable across both databases and easy to compare.
"""

from __future__ import annotations

import time
from typing import Iterator

from sqlalchemy import func, select

from vllm_otel.mitigate.records import KillSwitchState
from vllm_otel.mitigate.store.alerts import IngestResult, Notification, NotificationResult, AlertStore
from vllm_otel.mitigate.store.engine import DEFAULT_DB_URL, _text, normalize_db_url
from vllm_otel.mitigate.store.errors import StoreError, WriteWouldWait
from vllm_otel.mitigate.store.jobs import JobStore
from vllm_otel.mitigate.store.leases import LeaseStore
from vllm_otel.mitigate.store.outcomes import OutcomeStore
from vllm_otel.mitigate.store.schema import Base, KillSwitchEventRow

__all__ = ["Store", "StoreError", "WriteWouldWait", "IngestResult", "Notification", "NotificationResult",
           "DEFAULT_DB_URL", "normalize_db_url"]

_Q_KILL_SWITCH = select(KillSwitchEventRow.__table__).order_by(KillSwitchEventRow.id.desc()).limit(1)


class Store(AlertStore, JobStore, OutcomeStore, LeaseStore):
    """All database access of the receiver: its parts, plus the kill switch and inspection.
    Synchronous; call it from a thread in async code."""

    def set_kill_switch(self, engaged: bool, *, by: str | None = None, reason: str = "",
                        now: float | None = None) -> None:
        with self._write() as s:
            s.add(KillSwitchEventRow(at=time.time() if now is None else now, engaged=engaged,
                                     by=None if by is None else _text(by)[:255], reason=_text(reason)))

    def kill_switch(self) -> KillSwitchState:
        rows = self._read(_Q_KILL_SWITCH)
        row = rows[0] if rows else None
        if row is None:
            return KillSwitchState(engaged=False, source="default")
        return KillSwitchState(engaged=row.engaged, source="api", reason=row.reason, by=row.by,
                               at=row.at)

    def table_counts(self) -> dict[str, int]:
        with self._session() as s:
            return {t.name: s.scalar(select(func.count()).select_from(t)) or 0
                    for t in Base.metadata.sorted_tables}

    def iter_all_text(self) -> Iterator[str]:
        """Every stored value as text (tests use it to prove no secret was written)."""
        with self.engine.connect() as c:
            for t in Base.metadata.sorted_tables:
                for row in c.execute(select(t)):
                    yield " ".join("" if v is None else str(v) for v in row)
