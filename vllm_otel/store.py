"""Durable state of the mitigation loop: alerts, the audit trail, outcomes, dedupe keys, leases.

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

import functools
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

from sqlalchemy import (JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        bindparam, create_engine, delete, event, func, insert, or_, select,
                        update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from vllm_otel.mitigate.models import (EXECUTED_OUTCOMES, FAILED_OUTCOMES, ActionRecord,
                                       AlertmanagerAlert, AlertmanagerWebhook, AlertRecord, AlertStatus,
                                       JobRecord, JobState, KillSwitchState, Outcome,
                                       OutcomeRecord, to_unix)
from vllm_otel.redact import redact_mapping, redact_text

__all__ = ["Store", "StoreError", "IngestResult", "Notification", "NotificationResult", "DEFAULT_DB_URL",
           "normalize_db_url"]

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///vllm-otel-receiver.sqlite3"
# Free text (details, reasons) is bounded: an exception message can be a whole HTTP body.
_MAX_TEXT = 4000


_thread_state = threading.local()


class StoreError(RuntimeError):
    pass


class WriteWouldWait(StoreError):
    """A write told not to wait (``Store.write_now``) found another connection holding the SQLite
    write lock (another process on the same file): the caller writes elsewhere, later."""


def normalize_db_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the only PostgreSQL driver we depend on)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _text(s: Any) -> str:
    t = redact_text("" if s is None else s)
    return t if len(t) <= _MAX_TEXT else t[:_MAX_TEXT] + "...[truncated]"


def _floats(d: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (d or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


# --- schema ---------------------------------------------------------------------------------------

class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class WebhookRow(Base):
    """Every accepted notification (metadata only), for the audit trail."""

    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    group_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    receiver: Mapped[str] = mapped_column(String(255))
    n_alerts: Mapped[int] = mapped_column(Integer)
    truncated_alerts: Mapped[int] = mapped_column(Integer)
    replica: Mapped[str] = mapped_column(String(255))


class AlertRow(Base):
    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)  # the dedupe key
    fingerprint: Mapped[str] = mapped_column(String(128), index=True)
    alertname: Mapped[str] = mapped_column(String(255), index=True)
    instance: Mapped[str | None] = mapped_column(String(255), index=True)
    failure_type: Mapped[str | None] = mapped_column(String(255))
    severity: Mapped[str | None] = mapped_column(String(64))
    starts_at: Mapped[float] = mapped_column(Float)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    annotations: Mapped[dict[str, Any]] = mapped_column(JSON)
    generator_url: Mapped[str] = mapped_column(Text)
    group_key: Mapped[str] = mapped_column(Text)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    replica: Mapped[str] = mapped_column(String(255))


class AlertResolutionRow(Base):
    __tablename__ = "alert_resolutions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), unique=True)
    ends_at: Mapped[float | None] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    time_to_resolve_s: Mapped[float | None] = mapped_column(Float)


class AlertActivityRow(Base):
    """When an alert was last delivered (coordination: blast radius counts alerts still alive)."""

    __tablename__ = "alert_activity"
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), primary_key=True)
    instance: Mapped[str | None] = mapped_column(String(255), index=True)
    last_seen_at: Mapped[float] = mapped_column(Float, index=True)
    resolved: Mapped[bool] = mapped_column(Boolean, default=False)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), unique=True)
    target: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(32), index=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    action_id: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A pending job is not claimed before this (a re-check of its preconditions, deferred).
    run_after: Mapped[float | None] = mapped_column(Float)
    rechecks: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class ActionRow(Base):
    __tablename__ = "actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer)
    strategy: Mapped[str | None] = mapped_column(String(255), index=True)
    target: Mapped[str | None] = mapped_column(String(255), index=True)
    mode: Mapped[str] = mapped_column(String(32))
    why: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    guards: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    errors: Mapped[list[Any]] = mapped_column(JSON)
    metrics_before: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    replica: Mapped[str] = mapped_column(String(255))


class ActionEventRow(Base):
    """approved / started / finished: each at most once per action (the constraint is the lock)."""

    __tablename__ = "action_events"
    __table_args__ = (UniqueConstraint("action_id", "kind", name="uq_action_event_kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int] = mapped_column(ForeignKey("actions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    replica: Mapped[str] = mapped_column(String(255))


class OutcomeRow(Base):
    """Every outcome with its context: what the learner learns from."""

    __tablename__ = "outcomes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int | None] = mapped_column(ForeignKey("actions.id"), unique=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    alertname: Mapped[str | None] = mapped_column(String(255))
    failure_type: Mapped[str | None] = mapped_column(String(255))
    target: Mapped[str | None] = mapped_column(String(255), index=True)
    strategy: Mapped[str | None] = mapped_column(String(255), index=True)
    outcome: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    errors: Mapped[list[Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics_after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text)


class KillSwitchEventRow(Base):
    __tablename__ = "kill_switch_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    engaged: Mapped[bool] = mapped_column(Boolean)
    by: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)


class LockRow(Base):
    """Named leases: one action per target, one decision at a time across replicas."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[float] = mapped_column(Float)


# The hot insert path: Core statements built once, executed with bound parameters (no ORM unit
# of work, no per-call statement construction or cache-key computation).
_WEBHOOKS = WebhookRow.__table__
_ACTIVITY = AlertActivityRow.__table__
_JOBS = JobRow.__table__
_INSERTS = {t.name: insert(t) for t in (_WEBHOOKS, _ACTIVITY, _JOBS)}
_ALERT_ID_BY_KEY = select(AlertRow.id).where(AlertRow.key == bindparam("k"))
_TOUCH_ACTIVITY = (update(AlertActivityRow).where(AlertActivityRow.alert_id == bindparam("aid"))
                   .values(last_seen_at=bindparam("now")))

# The worker's guard reads, built once with bound parameters and run on a Core connection: per
# job the guards read a dozen times, and building each statement plus an ORM session cost ~4x
# the query itself (0.5 vs 0.14 ms of CPU, measured on SQLite).
_Q_LAST_START = {
    has_target: select(func.max(ActionEventRow.at))
    .join(ActionRow, ActionRow.id == ActionEventRow.action_id)
    .where(ActionEventRow.kind == "started", ActionRow.strategy == bindparam("s"),
           ActionRow.target == bindparam("t") if has_target else ActionRow.target.is_(None))
    for has_target in (True, False)}
_Q_EXECUTED = (select(OutcomeRow.__table__)
               .where(OutcomeRow.strategy == bindparam("s"), OutcomeRow.at >= bindparam("since"),
                      OutcomeRow.outcome.in_(sorted(EXECUTED_OUTCOMES)))
               .order_by(OutcomeRow.at.desc(), OutcomeRow.id.desc()).limit(bindparam("lim")))
_Q_ERRORS = {
    has_target: select(OutcomeRow.strategy, OutcomeRow.outcome, OutcomeRow.detail)
    .where(OutcomeRow.at >= bindparam("since"), OutcomeRow.outcome.in_(sorted(FAILED_OUTCOMES)),
           *((OutcomeRow.target == bindparam("t"),) if has_target else ()))
    .order_by(OutcomeRow.id.desc()).limit(bindparam("lim"))
    for has_target in (True, False)}
_Q_ACTIVE = (select(AlertActivityRow.instance)
             .where(AlertActivityRow.resolved.is_(False), AlertActivityRow.last_seen_at >= bindparam("since"),
                    AlertActivityRow.instance.is_not(None)).distinct())
_RES = AlertResolutionRow.__table__
_Q_ALERT = (select(AlertRow.__table__, _RES.c.ends_at.label("res_ends_at"),
                   _RES.c.received_at.label("res_received_at"), _RES.c.time_to_resolve_s.label("res_ttr"),
                   _RES.c.id.label("res_id"))
            .outerjoin(_RES, _RES.c.alert_id == AlertRow.id).where(AlertRow.id == bindparam("aid")))
_Q_OUTCOMES = {
    has_since: select(OutcomeRow.__table__)
    .where(OutcomeRow.id > bindparam("after"), *((OutcomeRow.at >= bindparam("since"),) if has_since else ()))
    .order_by(OutcomeRow.id).limit(bindparam("lim"))
    for has_since in (True, False)}
_Q_KILL_SWITCH = select(KillSwitchEventRow.__table__).order_by(KillSwitchEventRow.id.desc()).limit(1)

# The intake's common case on SQLite (new or resent firing alerts the policy maps), as plain SQL on
# the driver: SQLAlchemy's per-statement machinery cost ~0.6 ms of the ~1 ms an alert took to
# store, and every ms of CPU per alert is what a busy host multiplies. Same rows as the ORM path
# (tests/test_store.py compares the two table by table).
_WEBHOOK_COLS = ("received_at", "group_key", "status", "receiver", "n_alerts", "truncated_alerts", "replica")
_ALERT_COLS = ("key", "fingerprint", "alertname", "instance", "failure_type", "severity", "starts_at",
               "labels", "annotations", "generator_url", "group_key", "received_at", "replica")
_ALERT_JSON = frozenset({"labels", "annotations"})


def _insert_sql(table: str, cols: Sequence[str], tail: str = "") -> str:
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}){tail}"


_RAW_WEBHOOK = _insert_sql("webhooks", _WEBHOOK_COLS)
_RAW_ALERT = _insert_sql("alerts", _ALERT_COLS, " ON CONFLICT (key) DO NOTHING RETURNING id")
_RAW_ALERT_ID = "SELECT id FROM alerts WHERE key = ?"
_RAW_TOUCH = "UPDATE alert_activity SET last_seen_at = ? WHERE alert_id = ?"
_RAW_ACTIVITY = _insert_sql("alert_activity", ("alert_id", "instance", "last_seen_at", "resolved"))
_RAW_JOB = _insert_sql("jobs", ("alert_id", "target", "state", "owner", "lease_until", "attempts", "action_id",
                               "cancel_requested", "run_after", "rechecks", "created_at", "updated_at"))

# The worker's writes on SQLite, the same way (a dry-run job took ~15 ms of CPU in store calls
# through the ORM, most of it SQLAlchemy's per-transaction cost: ~0.55 ms a session, ~0.2 ms a
# Core connection, ~0.02 ms the driver). Same rows as the ORM path, which PostgreSQL keeps
# (tests/test_store.py runs its tests on both and compares the rows).
_JOB_COLS = ("id", "alert_id", "target", "state", "owner", "lease_until", "attempts", "action_id",
             "cancel_requested", "rechecks")
_CLAIMABLE_SQL = ("((state = ? AND (run_after IS NULL OR run_after <= ?))"
                  " OR (state = ? AND lease_until < ?))")
_RAW_CLAIMABLE = f"SELECT id FROM jobs WHERE {_CLAIMABLE_SQL} ORDER BY id LIMIT 20"
_RAW_CLAIM = ("UPDATE jobs SET state = ?, owner = ?, lease_until = ?, attempts = attempts + 1, "
              f"updated_at = ? WHERE id = ? AND {_CLAIMABLE_SQL} RETURNING {', '.join(_JOB_COLS)}")
_RAW_LOCK = ("INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?) "
             "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
             "expires_at = excluded.expires_at WHERE locks.expires_at < ? OR locks.owner = ?")
_RAW_UNLOCK = "DELETE FROM locks WHERE name = ? AND owner = ?"
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


def _row_args(values: Mapping[str, Any], cols: Sequence[str], json_cols: frozenset[str]) -> list[Any]:
    """Positional parameters for the driver: JSON columns encoded as SQLAlchemy's JSON type does
    (None too: it stores the JSON text 'null', not SQL NULL)."""
    return [json.dumps(values[c]) if c in json_cols else values[c] for c in cols]


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


# --- results --------------------------------------------------------------------------------------

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


# --- the store ------------------------------------------------------------------------------------

_BUSY_TIMEOUT_MS = 10_000


def _begin_or_would_wait(driver_conn: Any) -> None:
    """BEGIN IMMEDIATE on a connection whose busy timeout is 0: a taken lock -> WriteWouldWait."""
    try:
        driver_conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise WriteWouldWait(f"database is locked by another connection: {e}") from None
        raise


def _begin_immediate(driver_conn: Any) -> None:
    """BEGIN IMMEDIATE; inside ``Store.write_now`` (an event loop's thread, which must not sleep in
    SQLite's busy handler) it fails at once with :class:`WriteWouldWait` if the lock is taken."""
    if not getattr(_thread_state, "no_wait", False):
        driver_conn.execute("BEGIN IMMEDIATE")
        return
    driver_conn.execute("PRAGMA busy_timeout=0")
    try:
        _begin_or_would_wait(driver_conn)
    finally:
        driver_conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")


@contextmanager
def _driver_transaction(conn: Any, begin: Callable[[Any], None]) -> Iterator[Any]:
    """A transaction on a sqlite3 connection: committed when the block ends, rolled back if it
    raises."""
    begin(conn)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # not when BEGIN itself failed
            conn.execute("ROLLBACK")
        raise


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, synchronous: str = "NORMAL",
                    autocheckpoint: bool = True) -> None:
    # Driver-level autocommit so that our "begin" hooks decide how transactions start.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    try:
        cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    except Exception:  # noqa: BLE001 - in-memory databases have no WAL; harmless
        pass
    # In WAL mode, synchronous=NORMAL makes a commit durable against a crash or kill of the
    # process (a receiver restart, OOM kill, SIGKILL): the commit is in the WAL file, in the OS's
    # page cache, before COMMIT returns, and the next opener replays it. Only a crash of the
    # whole machine (power loss, kernel panic) can lose the last transactions; the WAL is synced
    # at each checkpoint. FULL adds one fsync per commit (the receiver's group commit shares it
    # among the alerts of a batch). Who needs durability against power loss on one SQLite file
    # adds ?synchronous=FULL to the URL; PostgreSQL (several replicas) syncs as its server says.
    cur.execute(f"PRAGMA synchronous={synchronous}")
    if not autocheckpoint:  # a _WalCheckpointer does it, off the writers' threads
        cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.close()


class _WalCheckpointer:
    """SQLite WAL checkpoints on a thread of their own, for a store whose writers do none.

    By default SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages, on the
    committing thread. With synchronous=NORMAL a checkpoint copies those ~4 MB into the database
    file and syncs both files: milliseconds, while a commit is ~0.1 ms. The receiver commits a
    webhook on its event loop's thread (``Store.write_now``), so every ~80th webhook (at ~13 pages
    each) waited for a checkpoint, and the loop with it: measured at 200 alerts/s, the receiver's
    p99 outside the host's slow spells was 4.9-5.5 ms with them inline, 1.9-2.4 ms without
    (benchmarks/README.md). Here the store's write connections have auto-checkpoints off and this
    thread runs a PASSIVE checkpoint (it waits for no lock and blocks no reader or writer) after
    every ``every`` commits; sqlite3 releases the GIL while it runs.

    The WAL starts over from its beginning only after a checkpoint that caught up with every
    commit, and writers that commit while a checkpoint runs can keep it from ever catching up (at
    200 webhooks/s they did): the WAL file would grow without end. So once the WAL holds more
    than ``max_frames`` pages, a second pass copies what the first could not with the store's
    write lock held (a few pages; this process's writers wait for it, as they waited for SQLite's
    own checkpoint; the event loop does not: write_now then hands its webhook to the writer
    thread), and the next commit starts the WAL over.
    """

    def __init__(self, path: str, synchronous: str, write_lock: ContextManager[Any], *,
                 every: int = 64, max_frames: int = 2000) -> None:
        self.path = path
        self.synchronous = synchronous
        self.every = every
        self.max_frames = max_frames
        self._write_lock = write_lock
        self.runs = 0  # checkpoints done (tests, debugging)
        self.locked_runs = 0  # of which under the write lock
        self._commits = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def committed(self) -> None:
        """One more commit on the store (called under its write lock)."""
        self._commits += 1
        if self._commits >= self.every:
            self._commits = 0
            self.request()

    def request(self) -> None:
        """Checkpoint soon."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stop:
                    self._thread = threading.Thread(target=self._run, name="sqlite-wal-checkpoint",
                                                    daemon=True)
                    self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            _sqlite_pragmas(conn, None, synchronous=self.synchronous)
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stop:
                    return
                try:
                    _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                    # The WAL file is reused from its start only by a writer that begins after a
                    # checkpoint caught up; concurrent writers may never let one catch up. Past
                    # max_frames, copy the rest with this process's writers held off.
                    if frames > self.max_frames:
                        with self._write_lock:
                            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        self.locked_runs += 1
                except sqlite3.Error as e:  # a checkpoint can wait for the next one; never fatal
                    log.warning("WAL checkpoint of %s failed: %s", self.path, e)
        finally:
            conn.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (a checkpoint under way finishes first)."""
        with self._start_lock:
            self._stop = True
            t = self._thread
        self._wake.set()
        if t is not None:
            t.join(timeout_s)


def _sqlite_begin(conn: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that reads, then writes
    # fails with "database is locked" instead of waiting when another connection wrote meanwhile.
    _begin_immediate(conn.connection.driver_connection)  # straight to sqlite3: cheaper


def _sqlite_begin_read(conn: Any) -> None:
    # Readers: a deferred transaction, so the queries of one read see one snapshot. In WAL mode it
    # neither takes nor waits for the write lock: the worker's reads never delay the intake.
    conn.connection.driver_connection.execute("BEGIN")


class Store:
    """All database access of the receiver. Synchronous; call it from a thread in async code."""

    def __init__(self, url: str = DEFAULT_DB_URL, *, replica_id: str | None = None,
                 create_schema: bool = True, echo: bool = False) -> None:
        self.url = normalize_db_url(url)
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        u = make_url(self.url)
        self.dialect = u.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        # One write transaction at a time in this process. On SQLite the database lock allows only
        # one writer anyway, and a connection that finds it taken polls with growing sleeps
        # (busy_timeout: 1, 2, 5, 10 ... 100 ms): queueing on a Python lock instead hands the
        # lock over the moment it is free. On PostgreSQL writers run concurrently: no lock.
        self._write_lock: threading.RLock | None = None
        if self.dialect == "sqlite":
            sync = str(u.query.get("synchronous", "NORMAL")).upper()
            if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise StoreError(f"synchronous={sync!r}: expected NORMAL, FULL, EXTRA or OFF")
            u = u.difference_update_query(["synchronous"])
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
            memory = u.database in (None, "", ":memory:")
            if memory:
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
            self._write_lock = threading.RLock()
        else:
            sync = ""
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(u, **kwargs)
        # Reads: on a SQLite file their own engine (deferred transactions, no write lock); the
        # in-memory database has one connection, shared.
        self.read_engine: Engine = self.engine
        # On a SQLite file, WAL checkpoints run on a thread of their own (see _WalCheckpointer).
        self._checkpointer: _WalCheckpointer | None = None
        if self.dialect == "sqlite":
            if not memory:
                self._checkpointer = _WalCheckpointer(u.database, sync,  # type: ignore[arg-type]
                                                      self._write_lock)
            pragmas = functools.partial(_sqlite_pragmas, synchronous=sync)
            event.listen(self.engine, "connect", functools.partial(
                _sqlite_pragmas, synchronous=sync, autocheckpoint=memory))
            event.listen(self.engine, "begin", _sqlite_begin)
            if not memory:
                self.read_engine = create_engine(u, **kwargs)
                event.listen(self.read_engine, "connect", pragmas)
                event.listen(self.read_engine, "begin", _sqlite_begin_read)
        # A commit that costs no fsync (SQLite WAL at synchronous NORMAL or OFF): cheap enough to
        # run on an event loop's thread (see write_now).
        self.cheap_commits = self.dialect == "sqlite" and sync in ("OFF", "NORMAL")
        # write_now's own connection to a SQLite file: busy timeout 0, so a lock held by another
        # process fails at once (no PRAGMA round trips per commit, no pool checkout).
        self._nowait_path = u.database if self.dialect == "sqlite" and not memory else None
        self._sync = sync
        self._nowait_conn: Any = None
        self._insert_ignore_factory: Any = None
        self._stmts: dict[Any, Any] = {}
        self.fast_ingest = self.dialect == "sqlite"  # see _ingest_firing_sqlite
        self.fast_worker = self.dialect == "sqlite"  # the worker's writes on the driver (_raw_write)
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert
            self._insert_ignore_factory = sqlite_insert
        elif self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert
            self._insert_ignore_factory = pg_insert
        if create_schema:
            self.create_schema()

    def create_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except (IntegrityError, ProgrammingError):
            # Two replicas creating the schema at once on PostgreSQL: the loser's CREATE TABLE
            # collides (pg_type unique key, or "already exists"); the tables exist either way.
            Base.metadata.create_all(self.engine)
        self._add_new_columns()

    # Columns added after the first release of the schema: (table, column, SQL type and default).
    # create_all() makes missing tables, not missing columns of an existing database.
    _ADDED_COLUMNS = (("jobs", "run_after", "FLOAT"), ("jobs", "rechecks", "INTEGER DEFAULT 0"))

    def _add_new_columns(self) -> None:
        from sqlalchemy import inspect

        have: dict[str, set[str]] = {}
        for table, column, ddl in self._ADDED_COLUMNS:
            if table not in have:
                have[table] = {c["name"] for c in inspect(self.engine).get_columns(table)}
            if column not in have[table]:
                try:
                    with self.engine.begin() as c:
                        c.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
                except (OperationalError, ProgrammingError):
                    pass  # another replica added it first
                have[table].add(column)

    def close(self) -> None:
        with self._write_lock if self._write_lock is not None else nullcontext():
            if self._nowait_conn is not None:
                self._nowait_conn.close()
                self._nowait_conn = None
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()

    def ping(self) -> bool:
        with self.engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
        return True

    # Foreground work (the receiver's webhook intake) has priority: ``background_gate``, when
    # set, is called before every database call of any other thread and may block for a while
    # (the receiver makes it wait, bounded, for a moment without webhooks in flight).
    background_gate: Callable[[], None] | None = None

    def mark_foreground_thread(self) -> None:
        """The calling thread's database calls never wait for ``background_gate``."""
        _thread_state.foreground = True

    def _yield_to_foreground(self) -> None:
        gate = self.background_gate
        if gate is not None and not getattr(_thread_state, "foreground", False):
            gate()

    @contextmanager
    def write_now(self) -> Iterator[bool]:
        """True inside when this process's write lock was free this instant and commits are cheap
        (it is then held for the block); False, holding nothing, when a write here would wait or
        cost an fsync. For a caller that must not block: it writes inline only on True, and a
        write inside that finds another process holding the database lock raises
        :class:`WriteWouldWait` instead of waiting."""
        lock = self._write_lock
        if lock is None or not self.cheap_commits or not lock.acquire(blocking=False):
            yield False
            return
        _thread_state.no_wait = True  # and another process's lock: WriteWouldWait, no sleeping
        try:
            yield True
        finally:
            _thread_state.no_wait = False
            lock.release()

    @contextmanager
    def _raw_write(self) -> Iterator[Any]:
        """One write transaction on the SQLite driver connection (BEGIN IMMEDIATE ... COMMIT, rolled
        back if the block raises), under this process's write lock: the fast paths."""
        self._yield_to_foreground()
        with self._write_lock if self._write_lock is not None else nullcontext():
            if self._nowait_path is not None and getattr(_thread_state, "no_wait", False):
                with _driver_transaction(self._nowait(), _begin_or_would_wait) as conn:
                    yield conn
            else:
                fairy = self.engine.raw_connection()
                try:
                    with _driver_transaction(fairy.driver_connection, _begin_immediate) as conn:
                        yield conn
                finally:
                    fairy.close()
            if self._checkpointer is not None:
                self._checkpointer.committed()

    def _nowait(self) -> Any:
        """write_now's connection (opened on first use; call with the write lock held)."""
        if self._nowait_conn is None:
            conn = sqlite3.connect(self._nowait_path, check_same_thread=False)  # type: ignore[arg-type]
            _sqlite_pragmas(conn, None, synchronous=self._sync, autocheckpoint=False)
            conn.execute("PRAGMA busy_timeout=0")
            self._nowait_conn = conn
        return self._nowait_conn

    def _raw_read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        self._yield_to_foreground()
        fairy = self.read_engine.raw_connection()
        try:
            return fairy.driver_connection.execute(sql, tuple(params)).fetchall()
        finally:
            fairy.close()

    def _read(self, stmt: Any, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Rows of one prebuilt Core statement (a read: no write lock, one snapshot)."""
        self._yield_to_foreground()
        with self.read_engine.connect() as c:
            return c.execute(stmt, dict(params or {})).all()

    def _session(self) -> Session:
        """A session for reads (no transaction block: it ends when the session closes)."""
        self._yield_to_foreground()
        return Session(self.read_engine, expire_on_commit=False)

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        self._yield_to_foreground()
        with self._write_lock if self._write_lock is not None else nullcontext():
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                yield s
            if self._checkpointer is not None:
                self._checkpointer.committed()

    def _insert_ignore(self, s: Session, model: Any, values: Mapping[str, Any],
                       conflict: Sequence[str]) -> int | None:
        """INSERT a row unless a unique key in ``conflict`` exists: its id, or None if it did.

        ON CONFLICT DO NOTHING keeps the surrounding transaction alive (an IntegrityError would
        abort it on PostgreSQL), so one transaction can hold many alerts, duplicates included.
        On PostgreSQL a concurrent insert of the same key waits for the other transaction and then
        does nothing if it committed."""
        table = model.__table__
        if self._insert_ignore_factory is not None:
            key = ("insert_ignore", table.name, tuple(conflict))
            stmt = self._stmts.get(key)
            if stmt is None:
                stmt = self._stmts[key] = (
                    self._insert_ignore_factory(table)
                    .on_conflict_do_nothing(index_elements=list(conflict)).returning(table.c.id))
            return s.connection().execute(stmt, dict(values)).scalar_one_or_none()
        try:  # pragma: no cover - other databases: a savepoint around a plain insert
            with s.begin_nested():
                return s.connection().execute(insert(table), dict(values)).inserted_primary_key[0]
        except IntegrityError:  # pragma: no cover
            return None

    @staticmethod
    def _insert(s: Session, table: Any, values: Mapping[str, Any]) -> int:
        """A plain INSERT of one row (Core, prebuilt statement, parameters bound): its id."""
        return s.connection().execute(_INSERTS[table.name], dict(values)).inserted_primary_key[0]

    # --- webhooks and alerts ----------------------------------------------------------------------

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

    # --- jobs ---------------------------------------------------------------------------------------

    @staticmethod
    def _job_record(j: JobRow) -> JobRecord:
        return JobRecord(id=j.id, alert_id=j.alert_id, target=j.target, state=JobState(j.state),
                         owner=j.owner, lease_until=j.lease_until, attempts=j.attempts,
                         action_id=j.action_id, cancel_requested=bool(j.cancel_requested),
                         rechecks=j.rechecks or 0)

    def claim_job(self, owner: str, lease_s: float, now: float | None = None) -> JobRecord | None:
        """Take one pending job (or one whose runner's lease ran out) for ``owner``.

        The conditional UPDATE is the whole protocol: on PostgreSQL the second of two racing
        updates re-checks the WHERE clause after the first commits and matches nothing.
        """
        now = time.time() if now is None else now
        if self.fast_worker:
            where = (JobState.PENDING.value, now, JobState.RUNNING.value, now)
            for (job_id,) in self._raw_read(_RAW_CLAIMABLE, where):
                with self._raw_write() as conn:
                    got = conn.execute(_RAW_CLAIM, (JobState.RUNNING.value, owner, now + lease_s, now,
                                                    job_id, *where)).fetchall()
                if got:
                    return self._job_record(_JobTuple(*got[0]))
            return None
        due = or_(JobRow.run_after.is_(None), JobRow.run_after <= now)
        claimable = or_((JobRow.state == JobState.PENDING.value) & due,
                        (JobRow.state == JobState.RUNNING.value) & (JobRow.lease_until < now))
        with self._session() as s:
            ids = list(s.scalars(select(JobRow.id).where(claimable).order_by(JobRow.id).limit(20)))
        for job_id in ids:
            with self._write() as s:
                res = s.execute(update(JobRow).where(JobRow.id == job_id, claimable).values(
                    state=JobState.RUNNING.value, owner=owner, lease_until=now + lease_s,
                    attempts=JobRow.attempts + 1, updated_at=now))
                if res.rowcount == 1:
                    return self._job_record(s.get(JobRow, job_id))  # type: ignore[arg-type]
        return None

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

    # --- actions ------------------------------------------------------------------------------------

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

    # --- what the guards ask ------------------------------------------------------------------------

    def last_start(self, strategy: str, target: str | None) -> float | None:
        """When ``strategy`` last started on ``target`` (cooldown)."""
        rows = self._read(_Q_LAST_START[target is not None], {"s": strategy, "t": target})
        return rows[0][0] if rows else None

    def starts_since(self, since: float, exclude_strategies: Sequence[str] = ()) -> int:
        """Actions started since ``since``, all targets (the global rate limit)."""
        q = (select(func.count()).select_from(ActionEventRow)
             .join(ActionRow, ActionRow.id == ActionEventRow.action_id)
             .where(ActionEventRow.kind == "started", ActionEventRow.at >= since))
        if exclude_strategies:
            q = q.where(or_(ActionRow.strategy.is_(None), ActionRow.strategy.not_in(list(exclude_strategies))))
        with self._session() as s:
            return s.scalar(q) or 0

    def executed_outcomes(self, strategy: str, *, since: float, limit: int) -> list[OutcomeRecord]:
        """Newest first: what really ran (circuit breaker)."""
        rows = self._read(_Q_EXECUTED, {"s": strategy, "since": since, "lim": limit})
        return [self._outcome_record(r) for r in rows]

    def recent_errors(self, target: str | None, *, since: float, limit: int = 5) -> list[str]:
        """What went wrong lately on this target, newest first (the learner's ``errors``)."""
        rows = self._read(_Q_ERRORS[target is not None], {"since": since, "t": target, "lim": limit})
        return [f"{r.strategy}: {r.outcome}: {r.detail}" for r in rows]

    def outcomes(self, *, after_id: int = 0, since: float | None = None,
                 limit: int = 1000) -> list[OutcomeRecord]:
        """Oldest first after ``after_id``: how learners catch up (also across replicas)."""
        rows = self._read(_Q_OUTCOMES[since is not None], {"after": after_id, "since": since, "lim": limit})
        return [self._outcome_record(r) for r in rows]

    @staticmethod
    def _outcome_record(r: Any) -> OutcomeRecord:  # an OutcomeRow, or a Core row of its table
        return OutcomeRecord(id=r.id, action_id=r.action_id, at=r.at, alertname=r.alertname,
                             failure_type=r.failure_type, target=r.target, strategy=r.strategy,
                             outcome=r.outcome, state=r.state or {}, errors=list(r.errors or []),
                             metrics=_floats(r.metrics), metrics_after=(
                                 None if r.metrics_after is None else _floats(r.metrics_after)),
                             duration_s=r.duration_s, detail=r.detail or "")

    # --- kill switch ----------------------------------------------------------------------------------

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

    # --- leases ---------------------------------------------------------------------------------------

    def acquire_lock(self, name: str, owner: str, ttl_s: float, now: float | None = None) -> bool:
        """Take (or renew, or take over an expired) named lease; False when someone else holds it."""
        now = time.time() if now is None else now
        if self.fast_worker:  # one upsert: taken if free, expired or already ours
            with self._raw_write() as conn:
                return conn.execute(_RAW_LOCK, (name, owner, now + ttl_s, now, owner)).rowcount == 1
        try:
            with self._write() as s:
                s.add(LockRow(name=name, owner=owner, expires_at=now + ttl_s))
                s.flush()
            return True
        except IntegrityError:
            pass
        with self._write() as s:
            res = s.execute(update(LockRow).where(LockRow.name == name, or_(
                LockRow.expires_at < now, LockRow.owner == owner)).values(owner=owner,
                                                                          expires_at=now + ttl_s))
            return res.rowcount == 1

    def release_lock(self, name: str, owner: str) -> None:
        if self.fast_worker:
            with self._raw_write() as conn:
                conn.execute(_RAW_UNLOCK, (name, owner))
            return
        with self._write() as s:
            s.execute(delete(LockRow).where(LockRow.name == name, LockRow.owner == owner))

    def lock_holder(self, name: str, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        with self._session() as s:
            row = s.get(LockRow, name)
            return row.owner if row is not None and row.expires_at >= now else None

    # --- inspection -----------------------------------------------------------------------------------

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
