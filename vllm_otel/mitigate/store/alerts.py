"""Webhooks and alerts: the intake's writes (one transaction per group commit) and alert reads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from vllm_otel.mitigate.records import (AlertmanagerAlert, AlertmanagerWebhook, AlertRecord, AlertStatus,
                                       JobState, Outcome, to_unix)
from vllm_otel.redact import redact_mapping
from vllm_otel.mitigate.store.errors import StoreError
from vllm_otel.mitigate.store.schema import ActionRow, AlertActivityRow, AlertResolutionRow, AlertRow, JobRow
from vllm_otel.mitigate.store.engine import _ACTIVITY, _JOBS, _WEBHOOKS, _insert_sql, _row_args, _text
from vllm_otel.mitigate.store.actions import ActionStore

_ALERT_ID_BY_KEY = select(AlertRow.id).where(AlertRow.key == bindparam("k"))
_TOUCH_ACTIVITY = (update(AlertActivityRow).where(AlertActivityRow.alert_id == bindparam("aid"))
                   .values(last_seen_at=bindparam("now")))

# Reads of the worker's guards, built once with bound parameters and run on a Core connection
# (see outcomes.py: building each statement plus an ORM session cost ~4x the query itself).
_Q_ACTIVE = (select(AlertActivityRow.instance)
             .where(AlertActivityRow.resolved.is_(False), AlertActivityRow.last_seen_at >= bindparam("since"),
                    AlertActivityRow.instance.is_not(None)).distinct())
_RES = AlertResolutionRow.__table__
_Q_ALERT = (select(AlertRow.__table__, _RES.c.ends_at.label("res_ends_at"),
                   _RES.c.received_at.label("res_received_at"), _RES.c.time_to_resolve_s.label("res_ttr"),
                   _RES.c.id.label("res_id"))
            .outerjoin(_RES, _RES.c.alert_id == AlertRow.id).where(AlertRow.id == bindparam("aid")))

# The intake's common case on SQLite (new or resent firing alerts the policy maps), as plain SQL on
# the driver: SQLAlchemy's per-statement machinery cost ~0.6 ms of the ~1 ms an alert took to
# store, and every ms of CPU per alert is what a busy host multiplies. Same rows as the ORM path
# (tests/integration/test_store.py compares the two table by table).
_WEBHOOK_COLS = ("received_at", "group_key", "status", "receiver", "n_alerts", "truncated_alerts", "replica")
_ALERT_COLS = ("key", "fingerprint", "alertname", "instance", "failure_type", "severity", "starts_at",
               "labels", "annotations", "generator_url", "group_key", "received_at", "replica")
_ALERT_JSON = frozenset({"labels", "annotations"})
_RAW_WEBHOOK = _insert_sql("webhooks", _WEBHOOK_COLS)
_RAW_ALERT = _insert_sql("alerts", _ALERT_COLS, " ON CONFLICT (key) DO NOTHING RETURNING id")
_RAW_ALERT_ID = "SELECT id FROM alerts WHERE key = ?"
_RAW_TOUCH = "UPDATE alert_activity SET last_seen_at = ? WHERE alert_id = ?"
_RAW_ACTIVITY = _insert_sql("alert_activity", ("alert_id", "instance", "last_seen_at", "resolved"))
_RAW_JOB = _insert_sql("jobs", ("alert_id", "target", "state", "owner", "lease_until", "attempts", "action_id",
                               "cancel_requested", "run_after", "rechecks", "created_at", "updated_at"))


@dataclass(frozen=True)
class IngestResult:
    alert_id: int
    new: bool                     # first time this dedupe key was seen
    job_id: int | None = None     # work created (mapped firing alert)
    resolved_now: bool = False    # this delivery recorded the resolution
    cancelled_jobs: int = 0
    cancelled_actions: tuple[str | None, ...] = ()  # strategies of awaiting actions cancelled


@dataclass(frozen=True)
class Notification:
    """One webhook for :meth:`Store.ingest`; ``unmapped``: per alert, why no policy rule matches
    (None: mapped; firing alerts only), as the receiver's policy decided before the write."""

    hook: AlertmanagerWebhook
    received_at: float
    unmapped: Sequence[str | None] = ()
    target_label: str = "instance"
    failure_type_label: str = "failure_type"
    create_jobs: bool = True


@dataclass(frozen=True)
class NotificationResult:
    webhook_id: int
    alerts: tuple[IngestResult, ...]  # one per alert of the notification, in order


class AlertStore(ActionStore):
    """Webhooks and alerts (an unmapped alert or a resolution also writes actions)."""


    def _webhook_values(self, hook: AlertmanagerWebhook, received_at: float | None) -> dict[str, Any]:
        return {"received_at": time.time() if received_at is None else received_at,
                "group_key": _text(hook.group_key), "status": hook.status.value,
                "receiver": hook.receiver[:255], "n_alerts": len(hook.alerts),
                "truncated_alerts": hook.truncated_alerts, "replica": self.replica_id}

    def record_webhook(self, hook: AlertmanagerWebhook, *, received_at: float | None = None) -> int:
        values = self._webhook_values(hook, received_at)
        with self._write() as s:
            return self._insert(s, _WEBHOOKS, values)

    def _alert_values(self, alert: AlertmanagerAlert, *, group_key: str, received_at: float,
                      target_label: str, failure_type_label: str) -> dict[str, Any]:
        """An alert's row, redacted (pure: computed before the write lock is taken)."""
        labels = redact_mapping(alert.labels)
        return {"key": alert.dedupe_key, "fingerprint": alert.fingerprint,
                "alertname": alert.alertname[:255], "instance": labels.get(target_label) or None,
                "failure_type": labels.get(failure_type_label), "severity": labels.get("severity"),
                "starts_at": to_unix(alert.starts_at), "labels": labels,
                "annotations": redact_mapping(alert.annotations),
                "generator_url": _text(alert.generator_url), "group_key": _text(group_key),
                "received_at": received_at, "replica": self.replica_id}

    def add_firing_alert(self, alert: AlertmanagerAlert, *, group_key: str = "",
                         received_at: float | None = None, create_job: bool = True,
                         unmapped_reason: str | None = None, target_label: str = "instance",
                         failure_type_label: str = "failure_type") -> IngestResult:
        """Record a firing alert once per dedupe key; with it, its job or its ``unmapped`` record.

        Everything for a new key is one transaction: a crash leaves either nothing (Alertmanager
        retries) or the alert with its work.
        """
        now = time.time() if received_at is None else received_at
        values = self._alert_values(alert, group_key=group_key, received_at=now,
                                    target_label=target_label, failure_type_label=failure_type_label)
        with self._write() as s:
            return self._firing(s, values, now=now, unmapped_reason=unmapped_reason,
                                create_job=create_job)

    def add_resolution(self, alert: AlertmanagerAlert, *, group_key: str = "",
                       received_at: float | None = None, target_label: str = "instance",
                       failure_type_label: str = "failure_type") -> IngestResult:
        """Record that an alert resolved (once), cancel its pending work, note time to resolve."""
        now = time.time() if received_at is None else received_at
        values = self._alert_values(alert, group_key=group_key, received_at=now,
                                    target_label=target_label, failure_type_label=failure_type_label)
        ends = to_unix(alert.ends_at) if alert.ends_at is not None else None
        with self._write() as s:
            return self._resolution(s, values, ends=ends, now=now)

    def ingest(self, notifications: Sequence["Notification"]) -> list["NotificationResult"]:
        """Record whole notifications, in order, in ONE transaction (one commit for all of them).

        The receiver's group commit: the webhooks that arrive while the previous commit runs are
        written together, and each is answered only after this returns. Same rows, same dedupe
        as :meth:`record_webhook` + :meth:`add_firing_alert` / :meth:`add_resolution` per alert.
        If it raises, nothing of the batch was written.
        """
        prepared = []
        for n in notifications:
            alerts = []
            for i, a in enumerate(n.hook.alerts):
                values = self._alert_values(a, group_key=n.hook.group_key, received_at=n.received_at,
                                            target_label=n.target_label,
                                            failure_type_label=n.failure_type_label)
                ends = to_unix(a.ends_at) if a.ends_at is not None else None
                unmapped = n.unmapped[i] if i < len(n.unmapped) else None
                alerts.append((a.status is AlertStatus.FIRING, values, ends, unmapped))
            prepared.append((n, self._webhook_values(n.hook, n.received_at), alerts))
        if self.fast_ingest and all(firing and unmapped is None
                                    for _, _, alerts in prepared for firing, _, _, unmapped in alerts):
            return self._ingest_firing_sqlite(prepared)
        out: list[NotificationResult] = []
        with self._write() as s:
            for n, webhook, alerts in prepared:
                wid = self._insert(s, _WEBHOOKS, webhook)
                results = tuple(
                    self._firing(s, values, now=n.received_at, unmapped_reason=unmapped,
                                 create_job=n.create_jobs) if firing
                    else self._resolution(s, values, ends=ends, now=n.received_at)
                    for firing, values, ends, unmapped in alerts)
                out.append(NotificationResult(webhook_id=wid, alerts=results))
        return out

    def _ingest_firing_sqlite(self, prepared: Sequence[tuple[Any, dict[str, Any], list[Any]]]
                              ) -> list["NotificationResult"]:
        """:meth:`ingest` for batches of mapped firing alerts on SQLite, on the driver connection:
        the same statements as :meth:`_firing`, one transaction, rolled back if anything fails."""
        out: list[NotificationResult] = []
        with self._raw_write() as conn:
            for n, webhook, alerts in prepared:
                wid = conn.execute(_RAW_WEBHOOK, [webhook[c] for c in _WEBHOOK_COLS]).lastrowid
                results = []
                for _, values, _, _ in alerts:
                    now = n.received_at
                    row = conn.execute(_RAW_ALERT, _row_args(values, _ALERT_COLS, _ALERT_JSON)).fetchone()
                    if row is None:  # seen before: only note it is alive
                        found = conn.execute(_RAW_ALERT_ID, (values["key"],)).fetchone()
                        if found is None:  # pragma: no cover - the conflict was on the key
                            raise StoreError(f"alert {values['key']!r} conflicted but is not there")
                        conn.execute(_RAW_TOUCH, (now, found[0]))
                        results.append(IngestResult(alert_id=found[0], new=False))
                        continue
                    alert_id = row[0]
                    conn.execute(_RAW_ACTIVITY, (alert_id, values["instance"], now, False))
                    job_id = None
                    if n.create_jobs:
                        job_id = conn.execute(_RAW_JOB, (
                            alert_id, values["instance"], JobState.PENDING.value, None, None, 0, None,
                            False, None, 0, now, now)).lastrowid
                    results.append(IngestResult(alert_id=alert_id, new=True, job_id=job_id))
                out.append(NotificationResult(webhook_id=wid, alerts=tuple(results)))
        return out

    def _firing(self, s: Session, values: Mapping[str, Any], *, now: float,
                unmapped_reason: str | None, create_job: bool) -> IngestResult:
        alert_id = self._insert_ignore(s, AlertRow, values, ["key"])
        if alert_id is None:
            # Seen before (a group resend, an HA peer, another replica): only note it is alive.
            conn = s.connection()
            existing = conn.execute(_ALERT_ID_BY_KEY, {"k": values["key"]}).scalar()
            if existing is None:  # pragma: no cover - the conflict was on the key
                raise StoreError(f"alert {values['key']!r} conflicted but is not there")
            conn.execute(_TOUCH_ACTIVITY, {"aid": existing, "now": now})
            return IngestResult(alert_id=existing, new=False)
        self._insert(s, _ACTIVITY, {"alert_id": alert_id, "instance": values["instance"],
                                    "last_seen_at": now, "resolved": False})
        job_id = None
        if unmapped_reason is not None:
            action = self._new_action(s, alert_id=alert_id, job_id=None, strategy=None,
                                      target=values["instance"], mode="none", why=unmapped_reason,
                                      confidence=None, params={}, guards=[], state={}, errors=[],
                                      metrics_before={}, at=now)
            self._finish(s, action, Outcome.UNMAPPED.value, detail=unmapped_reason, at=now,
                         alert=AlertRow(alertname=values["alertname"],
                                        failure_type=values["failure_type"]))
        elif create_job:
            job_id = self._insert(s, _JOBS, {
                "alert_id": alert_id, "target": values["instance"], "state": JobState.PENDING.value,
                "owner": None, "lease_until": None, "attempts": 0, "action_id": None,
                "cancel_requested": False, "created_at": now, "updated_at": now})
        return IngestResult(alert_id=alert_id, new=True, job_id=job_id)

    def _resolution(self, s: Session, values: Mapping[str, Any], *, ends: float | None,
                    now: float) -> IngestResult:
        new = False
        alert_id = s.scalar(select(AlertRow.id).where(AlertRow.key == values["key"]))
        if alert_id is None:
            # Resolved before we ever saw it firing (receiver was down): keep it for the record.
            alert_id = self._insert_ignore(s, AlertRow, values, ["key"])
            if alert_id is None:  # a peer recorded it just now
                alert_id = s.scalar(select(AlertRow.id).where(AlertRow.key == values["key"]))
            else:
                new = True
                self._insert(s, _ACTIVITY, {"alert_id": alert_id, "instance": values["instance"],
                                            "last_seen_at": now, "resolved": True})
        if alert_id is None:  # pragma: no cover
            raise StoreError(f"alert {values['key']!r} conflicted but is not there")
        resolution = self._insert_ignore(s, AlertResolutionRow, {
            "alert_id": alert_id, "ends_at": ends, "received_at": now,
            "time_to_resolve_s": max(0.0, (ends or now) - values["starts_at"])}, ["alert_id"])
        resolved_now = resolution is not None  # None: a resent resolution
        cancelled_actions: list[str | None] = []
        s.execute(update(AlertActivityRow).where(AlertActivityRow.alert_id == alert_id)
                  .values(resolved=True, last_seen_at=now))
        res = s.execute(update(JobRow).where(
            JobRow.alert_id == alert_id,
            JobRow.state.in_([JobState.PENDING.value, JobState.WAITING_APPROVAL.value]))
            .values(state=JobState.CANCELLED.value, updated_at=now))
        cancelled = res.rowcount or 0
        # Work already running finishes its step; it checks this flag before acting.
        s.execute(update(JobRow).where(JobRow.alert_id == alert_id,
                                       JobRow.state == JobState.RUNNING.value)
                  .values(cancel_requested=True, updated_at=now))
        if cancelled:
            # Awaiting-approval actions of cancelled jobs get their (final) outcome now.
            for job in s.scalars(select(JobRow).where(JobRow.alert_id == alert_id,
                                                      JobRow.state == JobState.CANCELLED.value,
                                                      JobRow.action_id.is_not(None))):
                action = s.get(ActionRow, job.action_id)
                if action is not None and not self._has_event(s, action.id, "finished"):
                    self._finish(s, action, Outcome.CANCELLED.value,
                                 detail="alert resolved before the action ran", at=now)
                    cancelled_actions.append(action.strategy)
        return IngestResult(alert_id=alert_id, new=new, resolved_now=resolved_now,
                            cancelled_jobs=cancelled, cancelled_actions=tuple(cancelled_actions))

    def alert(self, alert_id: int) -> AlertRecord | None:
        rows = self._read(_Q_ALERT, {"aid": alert_id})  # the worker reads one per job: prebuilt
        if not rows:
            return None
        r = rows[0]
        res = None if r.res_id is None else AlertResolutionRow(
            ends_at=r.res_ends_at, received_at=r.res_received_at, time_to_resolve_s=r.res_ttr)
        return self._alert_record(r, res)

    def alert_by_key(self, key: str) -> AlertRecord | None:
        with self._session() as s:
            aid = s.scalar(select(AlertRow.id).where(AlertRow.key == key))
        return None if aid is None else self.alert(aid)

    def alerts(self, limit: int = 100) -> list[AlertRecord]:
        with self._session() as s:
            rows = s.scalars(select(AlertRow).order_by(AlertRow.id.desc()).limit(limit)).all()
            res = {r.alert_id: r for r in s.scalars(select(AlertResolutionRow).where(
                AlertResolutionRow.alert_id.in_([r.id for r in rows])))}
            return [self._alert_record(r, res.get(r.id)) for r in rows]

    @staticmethod
    def _alert_record(row: Any, res: AlertResolutionRow | None) -> AlertRecord:  # ORM or Core row
        return AlertRecord(
            id=row.id, key=row.key, fingerprint=row.fingerprint, alertname=row.alertname,
            instance=row.instance, failure_type=row.failure_type, severity=row.severity,
            starts_at=row.starts_at, labels=row.labels or {}, annotations=row.annotations or {},
            generator_url=row.generator_url, group_key=row.group_key, received_at=row.received_at,
            resolved_at=None if res is None else (res.ends_at or res.received_at),
            time_to_resolve_s=None if res is None else res.time_to_resolve_s)

    def active_instances(self, since: float) -> set[str]:
        """Instances with an unresolved alert delivered since ``since`` (the blast radius)."""
        return {r[0] for r in self._read(_Q_ACTIVE, {"since": since}) if r[0]}
