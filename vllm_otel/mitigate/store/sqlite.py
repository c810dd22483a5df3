"""SQLite specifics: connection pragmas, how transactions begin, WAL checkpoints off the writers'
threads, and the no-wait write path of the event loop's thread."""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator


from vllm_otel.mitigate.store.errors import WriteWouldWait

log = logging.getLogger(__name__)

# Per thread: ``no_wait`` (inside Store.write_now), ``foreground`` (mark_foreground_thread).
_thread_state = threading.local()
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
