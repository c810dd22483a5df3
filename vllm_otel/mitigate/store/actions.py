"""Actions (the audit trail of decisions), their events and outcomes rows."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vllm_otel.mitigate.records import ActionRecord, Outcome
from vllm_otel.redact import redact_mapping
from vllm_otel.mitigate.store.errors import StoreError
from vllm_otel.mitigate.store.schema import (ActionEventRow, ActionRow, AlertResolutionRow, AlertRow, JobRow,
                                             OutcomeRow)
from vllm_otel.mitigate.store.engine import StoreEngine, _floats, _insert_sql, _row_args, _text

_ACTION_COLS = ("alert_id", "job_id", "strategy", "target", "mode", "why", "confidence", "params",
                "guards", "state", "errors", "metrics_before", "created_at", "replica")
_ACTION_JSON = frozenset({"params", "guards", "state", "errors", "metrics_before"})
_RAW_ACTION = _insert_sql("actions", _ACTION_COLS)
_RAW_ACTION_JOB = "UPDATE jobs SET action_id = ?, updated_at = ? WHERE id = ?"
_RAW_ACTION_GET = ("SELECT id, alert_id, target, strategy, state, errors, metrics_before "
                   "FROM actions WHERE id = ?")
_RAW_ALERT_NAMES = "SELECT alertname, failure_type FROM alerts WHERE id = ?"
_EVENT_COLS = ("action_id", "kind", "at", "data", "replica")
_RAW_EVENT = _insert_sql("action_events", _EVENT_COLS)
_OUTCOME_COLS = ("action_id", "at", "alertname", "failure_type", "target", "strategy", "outcome",
                 "state", "errors", "metrics", "metrics_after", "duration_s", "detail")
_OUTCOME_JSON = frozenset({"state", "errors", "metrics", "metrics_after"})
_RAW_OUTCOME = _insert_sql("outcomes", _OUTCOME_COLS)


@dataclass(frozen=True)
class _Row:
    """Attribute access to a driver row, as ORM rows give it (for the record builders)."""

    id: int
    alert_id: int | None = None
    target: str | None = None
    strategy: str | None = None
    state: Any = None
    errors: Any = None
    metrics_before: Any = None


class ActionStore(StoreEngine):
    """Actions, their events and their outcome rows."""


    def _new_action(self, s: Session, *, alert_id: int | None, job_id: int | None,
                    strategy: str | None, target: str | None, mode: str, why: str,
                    confidence: float | None, params: Mapping[str, Any], guards: Sequence[Any],
                    state: Mapping[str, Any], errors: Sequence[str],
                    metrics_before: Mapping[str, Any], at: float) -> ActionRow:
        row = ActionRow(**self._action_values(
            alert_id=alert_id, job_id=job_id, strategy=strategy, target=target, mode=mode, why=why,
            confidence=confidence, params=params, guards=guards, state=state, errors=errors,
            metrics_before=metrics_before, at=at))
        s.add(row)
        s.flush()
        return row

    def _action_values(self, *, alert_id: int | None, job_id: int | None, strategy: str | None,
                       target: str | None, mode: str, why: str, confidence: float | None,
                       params: Mapping[str, Any], guards: Sequence[Any], state: Mapping[str, Any],
                       errors: Sequence[str], metrics_before: Mapping[str, Any],
                       at: float) -> dict[str, Any]:
        """An action row's columns, redacted (both write paths)."""
        return {"alert_id": alert_id, "job_id": job_id, "strategy": strategy, "target": target,
                "mode": mode, "why": _text(why), "confidence": confidence,
                "params": redact_mapping(params), "guards": [redact_mapping(g) for g in guards],
                "state": redact_mapping(state), "errors": [_text(e) for e in errors][:20],
                "metrics_before": _floats(metrics_before), "created_at": at, "replica": self.replica_id}

    def create_action(self, *, alert_id: int | None, job_id: int | None, strategy: str | None,
                      target: str | None, mode: str, why: str, confidence: float | None = None,
                      params: Mapping[str, Any] | None = None,
                      guards: Sequence[Mapping[str, Any]] = (), state: Mapping[str, Any] | None = None,
                      errors: Sequence[str] = (), metrics_before: Mapping[str, Any] | None = None,
                      job_owner: str | None = None, now: float | None = None) -> int:
        """Append a decision; with ``job_id``/``job_owner`` it is also tied to its job."""
        now = time.time() if now is None else now
        if self.fast_worker:
            values = self._action_values(
                alert_id=alert_id, job_id=job_id, strategy=strategy, target=target, mode=mode,
                why=why, confidence=confidence, params=params or {}, guards=list(guards),
                state=state or {}, errors=list(errors), metrics_before=metrics_before or {}, at=now)
            with self._raw_write() as conn:
                action_id: int = conn.execute(_RAW_ACTION, _row_args(values, _ACTION_COLS,
                                                                     _ACTION_JSON)).lastrowid
                if job_id is not None:
                    conn.execute(_RAW_ACTION_JOB, (action_id, now, job_id))
            return action_id
        with self._write() as s:
            row = self._new_action(s, alert_id=alert_id, job_id=job_id, strategy=strategy,
                                   target=target, mode=mode, why=why, confidence=confidence,
                                   params=params or {}, guards=list(guards), state=state or {},
                                   errors=list(errors), metrics_before=metrics_before or {}, at=now)
            if job_id is not None:
                s.execute(update(JobRow).where(JobRow.id == job_id).values(action_id=row.id,
                                                                           updated_at=now))
            return row.id

    @staticmethod
    def _has_event(s: Session, action_id: int, kind: str) -> bool:
        return s.scalar(select(ActionEventRow.id).where(ActionEventRow.action_id == action_id,
                                                        ActionEventRow.kind == kind)) is not None

    def add_action_event(self, action_id: int, kind: str, data: Mapping[str, Any] | None = None,
                         now: float | None = None) -> bool:
        """Append ``kind`` for an action; False when it already happened (another replica won)."""
        if self.fast_worker:
            values = {"action_id": action_id, "kind": kind, "at": time.time() if now is None else now,
                      "data": redact_mapping(data or {}), "replica": self.replica_id}
            try:
                with self._raw_write() as conn:
                    conn.execute(_RAW_EVENT, _row_args(values, _EVENT_COLS, frozenset({"data"})))
                return True
            except sqlite3.IntegrityError:
                return False
        try:
            with self._write() as s:
                s.add(ActionEventRow(action_id=action_id, kind=kind, at=time.time() if now is None else now,
                                     data=redact_mapping(data or {}), replica=self.replica_id))
                s.flush()
            return True
        except IntegrityError:
            return False

    def _finish(self, s: Session, action: ActionRow, outcome: str, *, detail: str = "",
                result: Mapping[str, Any] | None = None,
                verification: Mapping[str, Any] | None = None,
                metrics_after: Mapping[str, Any] | None = None, duration_s: float | None = None,
                at: float, alert: AlertRow | None = None,
                guards: Sequence[Mapping[str, Any]] = ()) -> None:
        if alert is None and action.alert_id is not None:
            alert = s.get(AlertRow, action.alert_id)
        event, outcome_row = self._finish_values(
            action, alert, outcome, detail=detail, result=result, verification=verification,
            metrics_after=metrics_after, duration_s=duration_s, at=at, guards=guards)
        s.add(ActionEventRow(**event))
        s.add(OutcomeRow(**outcome_row))
        s.flush()

    def _finish_values(self, action: Any, alert: Any, outcome: str, *, detail: str,
                       result: Mapping[str, Any] | None, verification: Mapping[str, Any] | None,
                       metrics_after: Mapping[str, Any] | None, duration_s: float | None,
                       at: float, guards: Sequence[Mapping[str, Any]]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The 'finished' event and the outcome row of an action (both write paths)."""
        after = None if metrics_after is None else _floats(metrics_after)
        event = {"action_id": action.id, "kind": "finished", "at": at, "replica": self.replica_id,
                 "data": {"outcome": outcome, "detail": _text(detail),
                          "guards": [redact_mapping(g) for g in guards],
                          "result": None if result is None else redact_mapping(result),
                          "verification": None if verification is None else redact_mapping(verification),
                          "metrics_after": after, "duration_s": duration_s}}
        row = {"action_id": action.id, "at": at, "alertname": alert.alertname if alert else None,
               "failure_type": alert.failure_type if alert else None, "target": action.target,
               "strategy": action.strategy, "outcome": outcome, "state": action.state or {},
               "errors": action.errors or [], "metrics": action.metrics_before or {},
               "metrics_after": after, "duration_s": duration_s, "detail": _text(detail)}
        return event, row

    def finish_action(self, action_id: int, outcome: Outcome | str, *, detail: str = "",
                      result: Mapping[str, Any] | None = None,
                      verification: Mapping[str, Any] | None = None,
                      metrics_after: Mapping[str, Any] | None = None,
                      duration_s: float | None = None, guards: Sequence[Mapping[str, Any]] = (),
                      now: float | None = None) -> bool:
        """The action's final event and its outcome row, together; False if already finished.

        ``guards``: decisions taken after the action was recorded (an approved action's checks)."""
        outcome = outcome.value if isinstance(outcome, Outcome) else str(outcome)
        if self.fast_worker:
            try:
                with self._raw_write() as conn:
                    got = conn.execute(_RAW_ACTION_GET, (action_id,)).fetchone()
                    if got is None:
                        raise StoreError(f"no action {action_id}")
                    action = _Row(got[0], got[1], got[2], got[3], *(None if v is None else json.loads(v)
                                                                    for v in got[4:]))
                    names = (conn.execute(_RAW_ALERT_NAMES, (action.alert_id,)).fetchone()
                             if action.alert_id is not None else None)
                    event, row = self._finish_values(
                        action, None if names is None else AlertRow(alertname=names[0], failure_type=names[1]),
                        outcome, detail=detail, result=result, verification=verification,
                        metrics_after=metrics_after, duration_s=duration_s,
                        at=time.time() if now is None else now, guards=guards)
                    conn.execute(_RAW_EVENT, _row_args(event, _EVENT_COLS, frozenset({"data"})))
                    conn.execute(_RAW_OUTCOME, _row_args(row, _OUTCOME_COLS, _OUTCOME_JSON))
                return True
            except sqlite3.IntegrityError:
                return False
        try:
            with self._write() as s:
                action = s.get(ActionRow, action_id)
                if action is None:
                    raise StoreError(f"no action {action_id}")
                self._finish(s, action, outcome, detail=detail, result=result,
                             verification=verification, metrics_after=metrics_after,
                             duration_s=duration_s, at=time.time() if now is None else now,
                             guards=guards)
            return True
        except IntegrityError:
            return False

    def action(self, action_id: int) -> ActionRecord | None:
        got = self._actions(select(ActionRow).where(ActionRow.id == action_id))
        return got[0] if got else None

    def actions(self, *, limit: int = 100, offset: int = 0, alertname: str | None = None,
                fingerprint: str | None = None, strategy: str | None = None,
                alert_id: int | None = None, outcome: str | None = None) -> list[ActionRecord]:
        """The audit trail, newest first."""
        q = select(ActionRow)
        if alertname or fingerprint:
            q = q.join(AlertRow, AlertRow.id == ActionRow.alert_id)
            if alertname:
                q = q.where(AlertRow.alertname == alertname)
            if fingerprint:
                q = q.where(AlertRow.fingerprint == fingerprint)
        if strategy:
            q = q.where(ActionRow.strategy == strategy)
        if alert_id is not None:
            q = q.where(ActionRow.alert_id == alert_id)
        if outcome:
            q = q.where(ActionRow.id.in_(select(OutcomeRow.action_id).where(OutcomeRow.outcome == outcome)))
        q = q.order_by(ActionRow.id.desc()).limit(limit).offset(offset)
        return self._actions(q)

    def _actions(self, q: Any) -> list[ActionRecord]:
        with self._session() as s:
            rows = s.scalars(q).all()
            if not rows:
                return []
            ids = [r.id for r in rows]
            events: dict[int, dict[str, ActionEventRow]] = {}
            for ev in s.scalars(select(ActionEventRow).where(ActionEventRow.action_id.in_(ids))):
                events.setdefault(ev.action_id, {})[ev.kind] = ev
            alert_ids = {r.alert_id for r in rows if r.alert_id is not None}
            alerts = {a.id: a for a in s.scalars(select(AlertRow).where(AlertRow.id.in_(alert_ids)))}
            res = {r.alert_id: r for r in s.scalars(select(AlertResolutionRow).where(
                AlertResolutionRow.alert_id.in_(alert_ids)))}
            return [self._action_record(r, events.get(r.id, {}), alerts.get(r.alert_id),
                                        res.get(r.alert_id)) for r in rows]

    @staticmethod
    def _action_record(r: ActionRow, ev: Mapping[str, ActionEventRow], a: AlertRow | None,
                       res: AlertResolutionRow | None) -> ActionRecord:
        fin = ev.get("finished")
        fd = fin.data if fin is not None else {}
        if fin is not None:
            status = "finished"
        elif "started" in ev:
            status = "running"
        elif "approved" in ev:
            status = "approved"
        elif r.mode == "approval":
            status = "awaiting_approval"
        else:
            status = "decided"
        approved = ev.get("approved")
        return ActionRecord(
            id=r.id, alert_id=r.alert_id, fingerprint=a.fingerprint if a else None,
            alertname=a.alertname if a else None, instance=a.instance if a else None,
            target=r.target, strategy=r.strategy, params=r.params or {}, why=r.why,
            confidence=r.confidence, mode=r.mode,
            guards=list(r.guards or []) + [g for kind in ("started", "finished") if kind in ev
                                           for g in (ev[kind].data or {}).get("guards", [])],
            metrics_before=r.metrics_before or {}, metrics_after=fd.get("metrics_after"),
            result=fd.get("result"), verification=fd.get("verification"), status=status,
            outcome=fd.get("outcome"), detail=fd.get("detail"), replica=r.replica,
            created_at=r.created_at, approved_at=approved.at if approved else None,
            approved_by=(approved.data or {}).get("by") if approved else None,
            started_at=ev["started"].at if "started" in ev else None,
            finished_at=fin.at if fin is not None else None, duration_s=fd.get("duration_s"),
            alert_starts_at=a.starts_at if a else None, alert_received_at=a.received_at if a else None,
            alert_resolved_at=None if res is None else (res.ends_at or res.received_at),
            time_to_resolve_s=None if res is None else res.time_to_resolve_s)

    def action_events(self, action_id: int) -> dict[str, dict[str, Any]]:
        with self._session() as s:
            return {e.kind: {"at": e.at, "data": e.data, "replica": e.replica} for e in s.scalars(
                select(ActionEventRow).where(ActionEventRow.action_id == action_id))}
