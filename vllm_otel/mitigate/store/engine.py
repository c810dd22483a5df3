"""Connections and transactions of the store on SQLite and PostgreSQL (``StoreEngine``: the base
of every part of the :class:`~vllm_otel.mitigate.store.Store`), and the helpers its parts share."""

from __future__ import annotations

import functools
import json
import os
import socket
import sqlite3
import threading
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping, Sequence

from sqlalchemy import create_engine, event, insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from vllm_otel.redact import redact_text
from vllm_otel.mitigate.store.errors import StoreError
from vllm_otel.mitigate.store.schema import AlertActivityRow, Base, JobRow, WebhookRow
from vllm_otel.mitigate.store.sqlite import (_begin_immediate, _begin_or_would_wait, _driver_transaction,
                                             _sqlite_begin, _sqlite_begin_read, _sqlite_pragmas,
                                             _thread_state, _WalCheckpointer)

DEFAULT_DB_URL = "sqlite:///vllm-otel-receiver.sqlite3"
# Free text (details, reasons) is bounded: an exception message can be a whole HTTP body.
_MAX_TEXT = 4000


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


# The hot insert path: Core statements built once, executed with bound parameters (no ORM unit
# of work, no per-call statement construction or cache-key computation).
_WEBHOOKS = WebhookRow.__table__
_ACTIVITY = AlertActivityRow.__table__
_JOBS = JobRow.__table__
_INSERTS = {t.name: insert(t) for t in (_WEBHOOKS, _ACTIVITY, _JOBS)}


def _insert_sql(table: str, cols: Sequence[str], tail: str = "") -> str:
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}){tail}"


def _row_args(values: Mapping[str, Any], cols: Sequence[str], json_cols: frozenset[str]) -> list[Any]:
    """Positional parameters for the driver: JSON columns encoded as SQLAlchemy's JSON type does
    (None too: it stores the JSON text 'null', not SQL NULL)."""
    return [json.dumps(values[c]) if c in json_cols else values[c] for c in cols]


class StoreEngine:
    """Connections, transactions and the write lock: what every part of the store builds on.
    Synchronous; call it from a thread in async code."""

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
