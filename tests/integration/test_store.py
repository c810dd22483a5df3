"""The store on SQLite and on a real PostgreSQL server (started by the tests): dedupe keys,
append-only audit, job claims and leases under concurrency, redaction at the door."""

from __future__ import annotations

import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

import vllm_otel.mitigate.store as store_mod
from vllm_otel.mitigate.records import AlertmanagerAlert, AlertmanagerWebhook, JobState, Outcome
from vllm_otel.mitigate.store import Store, normalize_db_url


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    from vllm_otel.testing.postgres import PostgresNotAvailable, PostgresServer

    try:
        server = PostgresServer()
    except PostgresNotAvailable as e:
        pytest.fail(str(e))
    with server:
        yield server


# "sqlite-orm": SQLite with its fast paths off (the ORM / Core code PostgreSQL runs), so every
# store test checks both ways of writing SQLite.
@pytest.fixture(params=["sqlite", "sqlite-orm", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'store.db'}"
    pg = request.getfixturevalue("postgres")
    return pg.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(db_url: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    s = Store(db_url, replica_id="test-replica")
    if request.node.callspec.params.get("db_url") == "sqlite-orm":
        s.fast_ingest = s.fast_worker = False
    yield s
    s.close()


def alert(name: str = "VllmKvCacheNearlyFull", instance: str = "10.0.0.1:8000", *,
          status: str = "firing", starts: datetime | None = None, ends: datetime | None = None,
          fingerprint: str = "aaaabbbbccccdddd", **labels: str) -> AlertmanagerAlert:
    starts = starts or datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    return AlertmanagerAlert.model_validate({
        "status": status, "labels": {"alertname": name, "instance": instance, **labels},
        "annotations": {"summary": "s"}, "startsAt": starts.isoformat(),
        "endsAt": ends.isoformat() if ends else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prom/graph", "fingerprint": fingerprint})


T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=timezone.utc).timestamp()


def webhook(*alerts: AlertmanagerAlert, **fields: Any) -> AlertmanagerWebhook:
    """A firing v4 notification holding ``alerts``; ``fields`` override its top-level keys."""
    return AlertmanagerWebhook.model_validate({
        "version": "4", "status": "firing", "receiver": "r", "groupKey": "g",
        "alerts": [x.model_dump(mode="json", by_alias=True) for x in alerts], **fields})


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_db_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("sqlite:///x.db") == "sqlite:///x.db"


def test_firing_alert_deduped_by_fingerprint_and_starts_at(store: Store) -> None:
    first = store.add_firing_alert(alert(), group_key="g", received_at=T0)
    assert first.new and first.job_id is not None
    again = store.add_firing_alert(alert(), group_key="g", received_at=T0 + 60)
    assert not again.new and again.alert_id == first.alert_id and again.job_id is None
    # Same series firing anew after a resolve: new startsAt, new alert, new job.
    later = store.add_firing_alert(alert(starts=datetime(2026, 1, 1, 13, tzinfo=timezone.utc)))
    assert later.new and later.alert_id != first.alert_id
    counts = store.table_counts()
    assert counts["alerts"] == 2 and counts["jobs"] == 2
    # The resend kept the alert alive for the blast-radius count.
    assert store.active_instances(since=T0 + 30) == {"10.0.0.1:8000"}
    rec = store.alert(first.alert_id)
    assert rec is not None and rec.alertname == "VllmKvCacheNearlyFull" and rec.starts_at == pytest.approx(T0)


def test_nanosecond_and_offset_timestamps_share_a_key() -> None:
    a = AlertmanagerAlert.model_validate({"status": "firing", "labels": {}, "fingerprint": "f",
                                          "startsAt": "2026-01-01T12:00:00.123456789Z"})
    b = AlertmanagerAlert.model_validate({"status": "firing", "labels": {}, "fingerprint": "f",
                                          "startsAt": "2026-01-01T14:00:00.123456+02:00"})
    assert a.dedupe_key == b.dedupe_key and a.ends_at is None


def test_unmapped_alert_is_an_outcome_without_a_job(store: Store) -> None:
    res = store.add_firing_alert(alert("Other"), unmapped_reason="no rule for Other")
    assert res.new and res.job_id is None
    [act] = store.actions()
    assert act.outcome == Outcome.UNMAPPED.value and act.status == "finished" and act.strategy is None
    [out] = store.outcomes()
    assert out.outcome == "unmapped" and out.alertname == "Other"
    store.add_firing_alert(alert("Other"), unmapped_reason="no rule for Other")  # resend: nothing new
    assert store.table_counts()["actions"] == 1


def test_ingest_stores_many_notifications_in_one_transaction(store: Store) -> None:
    """The receiver's group commit: same rows and dedupe as alert by alert, one commit."""
    from vllm_otel.mitigate.store import Notification

    a, b = alert(fingerprint="a" * 16), alert(fingerprint="b" * 16, instance="10.0.0.2:8000")
    other = alert("Other", fingerprint="c" * 16)

    res_a = AlertmanagerAlert.model_validate(dict(a.model_dump(mode="json", by_alias=True),
                                                  status="resolved", endsAt="2026-01-01T12:00:30Z"))
    out = store.ingest([
        Notification(webhook(a, b), received_at=T0, unmapped=(None, None)),
        Notification(webhook(a), received_at=T0 + 1, unmapped=(None,)),            # a resend
        Notification(webhook(other), received_at=T0 + 2, unmapped=("no rule",)),   # unmapped
        Notification(webhook(res_a), received_at=T0 + 3),                           # a resolves
    ])
    assert [len(n.alerts) for n in out] == [2, 1, 1, 1]
    first_a, first_b = out[0].alerts
    assert first_a.new and first_b.new and first_a.job_id and first_b.job_id
    assert not out[1].alerts[0].new and out[1].alerts[0].alert_id == first_a.alert_id
    assert out[2].alerts[0].new and out[2].alerts[0].job_id is None
    assert out[3].alerts[0].resolved_now and out[3].alerts[0].cancelled_jobs == 1
    counts = store.table_counts()
    assert counts["webhooks"] == 4 and counts["alerts"] == 3 and counts["jobs"] == 2
    assert counts["alert_resolutions"] == 1 and counts["outcomes"] == 1  # the unmapped one
    assert store.job_for_alert(first_a.alert_id).state is JobState.CANCELLED
    assert store.job_for_alert(first_b.alert_id).state is JobState.PENDING
    # The same again: all duplicates, nothing new, the resolution not recorded twice.
    again = store.ingest([Notification(webhook(a, b), received_at=T0 + 4),
                          Notification(webhook(res_a), received_at=T0 + 5)])
    assert not any(r.new for n in again for r in n.alerts)
    assert not again[1].alerts[0].resolved_now
    assert store.table_counts()["alerts"] == 3 and store.table_counts()["alert_resolutions"] == 1


def test_ingest_is_all_or_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_otel.mitigate.store import Notification

    hook = webhook(*(alert(fingerprint=f"{i:016d}") for i in range(3)))
    calls = {"n": 0}
    real = Store._firing

    def flaky(self: Store, *a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "_firing", flaky)
    store.fast_ingest = False  # the ORM path here; the SQLite fast path below
    with pytest.raises(RuntimeError):
        store.ingest([Notification(hook, received_at=T0)])
    assert store.table_counts()["alerts"] == 0 and store.table_counts()["webhooks"] == 0


def test_sqlite_fast_ingest_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_otel.mitigate.store import Notification

    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    assert store.fast_ingest
    hook = webhook(*(alert(fingerprint=f"{i:016d}") for i in range(3)))
    calls = {"n": 0}
    real = Store._alert_values

    def unbindable_third(self: Store, *a: Any, **kw: Any) -> dict[str, Any]:
        calls["n"] += 1
        values = real(self, *a, **kw)
        return dict(values, severity=object()) if calls["n"] == 3 else values

    monkeypatch.setattr(Store, "_alert_values", unbindable_third)
    with pytest.raises(Exception, match="not supported|unsupported"):
        store.ingest([Notification(hook, received_at=T0)])
    assert store.table_counts()["alerts"] == 0 and store.table_counts()["webhooks"] == 0
    monkeypatch.undo()
    store.ingest([Notification(hook, received_at=T0)])  # the connection is usable after the rollback
    assert store.table_counts()["alerts"] == 3
    store.close()


def test_sqlite_fast_ingest_writes_what_the_orm_path_writes(tmp_path: Path) -> None:
    """The intake's SQLite fast path (mapped firing alerts, plain SQL on the driver) and the ORM
    path store the same rows and return the same results, duplicates and no-job batches included."""
    import sqlite3

    from vllm_otel.mitigate.store import Notification

    def hook(*alerts: AlertmanagerAlert) -> AlertmanagerWebhook:
        return webhook(*alerts, groupKey='g{x="1"}', truncatedAlerts=2)

    a = alert(fingerprint="a" * 16, model_name="m", token="hf_" + "x" * 30)  # a secret, redacted
    b = alert("VllmRequestsQueueing", instance="10.0.0.2:8000", fingerprint="b" * 16)
    c = alert(fingerprint="c" * 16, starts=datetime(2026, 1, 2, tzinfo=timezone.utc))
    batches = [
        [Notification(hook(a, b), received_at=T0), Notification(hook(a), received_at=T0 + 0.5)],
        [Notification(hook(b, c, c), received_at=T0 + 1)],
        [Notification(hook(c), received_at=T0 + 2, create_jobs=False)],
    ]
    dumps, results = [], []
    for fast in (True, False):
        path = tmp_path / f"{fast}.db"
        store = Store(f"sqlite:///{path}", replica_id="r1")
        store.fast_ingest = fast
        results.append([store.ingest(batch) for batch in batches])
        store.close()
        con = sqlite3.connect(path)
        dumps.append({t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                      for t in ("webhooks", "alerts", "alert_activity", "jobs", "actions", "outcomes")})
        con.close()
    assert results[0] == results[1]
    assert dumps[0] == dumps[1]
    assert len(dumps[0]["alerts"]) == 3 and len(dumps[0]["jobs"]) == 3 and len(dumps[0]["webhooks"]) == 4
    assert "hf_" not in str(dumps[0]["alerts"])


def test_sqlite_fast_worker_writes_what_the_orm_path_writes(tmp_path: Path) -> None:
    """The worker's SQLite fast paths (claim, locks, actions, events, outcomes, job states on the
    driver) and the ORM path leave the same rows and return the same results."""
    import sqlite3

    a = alert(fingerprint="a" * 16, model_name="m")
    b = alert("VllmRequestsQueueing", instance="10.0.0.2:8000", fingerprint="b" * 16)
    dumps, results = [], []
    for fast in (True, False):
        path = tmp_path / f"{fast}.db"
        st = Store(f"sqlite:///{path}", replica_id="r1")
        st.fast_worker = fast
        out: list[Any] = []
        st.add_firing_alert(a, received_at=T0)
        st.add_firing_alert(b, received_at=T0)
        j1 = st.claim_job("w1", 30, now=T0 + 1)
        j2 = st.claim_job("w2", 30, now=T0 + 1)
        out += [j1, j2, st.claim_job("w3", 30, now=T0 + 1)]  # nothing left: None
        out += [st.acquire_lock("decide", "w1", 10, now=T0 + 1), st.acquire_lock("decide", "w2", 10, now=T0 + 1),
                st.acquire_lock("decide", "w1", 10, now=T0 + 2)]  # held; renewed by its owner
        act = st.create_action(alert_id=j1.alert_id, job_id=j1.id, strategy="poke", target=j1.target,
                               mode="auto", why="because " + "hf_" + "x" * 30, confidence=0.5,
                               params={"level": 1, "api_key": "sk-secret"}, guards=[{"guard": "g", "ok": True}],
                               state={"kv": 0.9}, errors=["e1"], metrics_before={"kv": 0.9, "bad": "x"},
                               job_owner="w1", now=T0 + 2)
        out += [act, st.add_action_event(act, "started", {"by": "w1"}, now=T0 + 2),
                st.add_action_event(act, "started", {"by": "w2"}, now=T0 + 2)]  # once only
        st.release_lock("decide", "w1")
        out += [st.acquire_lock("decide", "w2", 10, now=T0 + 3)]
        out += [st.finish_action(act, Outcome.SUCCESS, detail="done", result={"ok": True},
                                 verification={"ok": True}, metrics_after={"kv": 0.5}, duration_s=1.5,
                                 guards=[{"guard": "late", "ok": True}], now=T0 + 4),
                st.finish_action(act, Outcome.FAILURE, now=T0 + 5)]  # already finished
        bare = st.create_action(alert_id=None, job_id=None, strategy=None, target=None, mode="none",
                                why="no alert", now=T0 + 5)
        out += [st.finish_action(bare, "skipped", now=T0 + 6)]
        out += [st.set_job_state(j1.id, "w1", JobState.DONE, action_id=act, now=T0 + 6),
                st.set_job_state(j2.id, "w1", JobState.DONE, now=T0 + 6),  # not its owner
                st.set_job_state(j2.id, "w2", JobState.RUNNING, now=T0 + 6)]
        with pytest.raises(store_mod.StoreError):
            st.finish_action(999, Outcome.SUCCESS)
        out += [st.claim_job("w4", 30, now=T0 + 100)]  # j2's lease ran out: taken over
        out += [st.outcomes(), st.alert(j1.alert_id), st.action(act)]
        results.append(out)
        st.close()
        con = sqlite3.connect(path)
        dumps.append({t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                      for t in ("jobs", "locks", "actions", "action_events", "outcomes")})
        con.close()
    assert results[0] == results[1]
    (j1, j2, none, l1, l2, l3, act, e1, e2, l4, f1, f2, f3, s1, s2, s3, j4, outs, al, rec) = results[0]
    assert j1.owner == "w1" and j2.owner == "w2" and none is None
    assert (l1, l2, l3, e1, e2, l4) == (True, False, True, True, False, True)
    assert (f1, f2, f3, s1, s2, s3) == (True, False, True, True, False, True)
    assert j4.id == j2.id and j4.owner == "w4" and j4.attempts == 2
    assert [o.outcome for o in outs] == ["success", "skipped"] and outs[0].metrics_after == {"kv": 0.5}
    assert al.fingerprint == "a" * 16 and rec.outcome == "success" and rec.strategy == "poke"
    for t in dumps[0]:
        assert dumps[0][t] == dumps[1][t], (t, [(x, y) for x, y in zip(dumps[0][t], dumps[1][t]) if x != y])
    assert len(dumps[0]["outcomes"]) == 2 and len(dumps[0]["action_events"]) == 3
    assert "sk-secret" not in str(dumps[0]) and "hf_" not in str(dumps[0])


def test_sqlite_reads_do_not_take_the_write_lock(tmp_path: Path) -> None:
    """WAL + deferred read transactions: a reader never waits for (or blocks) the writer."""
    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        s.add_firing_alert(alert())
        with s._write() as w:  # a write transaction stays open ...
            w.connection().exec_driver_sql("UPDATE jobs SET attempts = attempts")
            t0 = time.monotonic()
            assert len(s.alerts()) == 1  # ... and a read still answers at once
            assert s.job_counts()["pending"] == 1
            assert time.monotonic() - t0 < 2.0
    finally:
        s.close()


def test_sqlite_synchronous_from_the_url(tmp_path: Path) -> None:
    for url, want in ((f"sqlite:///{tmp_path / 'a.db'}", 1), (f"sqlite:///{tmp_path / 'b.db'}?synchronous=FULL", 2)):
        s = Store(url)
        try:
            with s.engine.connect() as c:
                assert c.exec_driver_sql("PRAGMA synchronous").scalar() == want  # 1 NORMAL, 2 FULL
                assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        finally:
            s.close()
    with pytest.raises(Exception, match="synchronous"):
        Store(f"sqlite:///{tmp_path / 'c.db'}?synchronous=sometimes")


def _wal_frames(path: Path) -> int:
    """How many pages the WAL file of ``path`` has room for (32-byte header, 24 bytes + a page per
    frame). SQLite reuses the file from its start after a checkpoint that caught up, so this is
    the most it ever held."""
    import sqlite3

    con = sqlite3.connect(path)
    try:
        page = con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()
    wal = path.with_name(path.name + "-wal")
    return max(0, (wal.stat().st_size - 32) // (24 + page)) if wal.exists() else 0


@pytest.mark.parametrize("inline", [True, False], ids=["write_now", "writer-thread"])
def test_sqlite_checkpoints_run_on_their_own_thread(tmp_path: Path, inline: bool) -> None:
    """SQLite's auto-checkpoint runs inside the COMMIT that takes the WAL past 1,000 pages, on the
    committing thread, and syncs two files: on the receiver's event loop (write_now) that stalled
    every ~80th webhook. The store's writers now never checkpoint; its checkpoint thread does,
    every ``every`` commits, so the WAL stays bounded."""
    from vllm_otel.mitigate.store import Notification

    db = tmp_path / "c.db"
    s = Store(f"sqlite:///{db}")
    ck = s._checkpointer
    assert ck is not None
    ck.every = 10**9  # first: nobody checkpoints
    try:
        def commit_many(n: int, base: int) -> None:
            for i in range(n):
                hook = webhook(alert(fingerprint=f"{base + i:016d}"))
                if inline:
                    with s.write_now() as free:
                        if free:
                            s.ingest([Notification(hook, received_at=T0)])
                            continue
                # Not inline, or the lock is taken (a checkpoint's second pass): as the writer
                # thread would, waiting for the lock.
                s.ingest([Notification(hook, received_at=T0)])

        commit_many(300, 0)  # ~10 pages each: ~3,000 pages, three times SQLite's threshold
        grown = _wal_frames(db)
        assert grown > 2000, f"a commit checkpointed: only {grown} frames in the WAL"
        assert ck.runs == 0
        ck.every = 50
        commit_many(300, 1000)
        # Requests made while a checkpoint runs merge into the next one (on a slow disk the first,
        # copying ~3,000 pages, outlasted several requests: a full run on a slower VM counted 4
        # runs for 6), so count that it ran, with a locked pass for the long WAL, and that it runs
        # again when asked.
        def ran(n: int) -> None:
            deadline = time.monotonic() + 10
            while ck.runs < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ck.runs >= n, (ck.runs, n)

        ran(1)
        before = ck.runs
        commit_many(50, 1300)
        ran(before + 1)
        assert ck.locked_runs >= 1  # counted after its run: checked once a later run began
        # Once a checkpoint caught up, the WAL starts over from the beginning of its file: it
        # stops growing, though these writers never pause (then a checkpoint takes the lock).
        size = _wal_frames(db)
        commit_many(300, 2000)  # another ~3,000 pages
        assert _wal_frames(db) <= size + 100
        assert s.table_counts()["alerts"] == 950
    finally:
        s.close()
    # close() stops this store's thread (other stores of the test session may have their own).
    assert ck._thread is not None and not ck._thread.is_alive()


def test_resolution_once_cancels_pending_and_flags_running(store: Store) -> None:
    a, b = alert(fingerprint="a" * 16), alert(fingerprint="b" * 16, instance="10.0.0.2:8000")
    ra, rb = store.add_firing_alert(a), store.add_firing_alert(b)
    # b's job is running: its runner finishes its step but sees the flag before acting.
    claimed = [store.claim_job("r", 60), store.claim_job("r", 60)]
    running = next(j for j in claimed if j and j.alert_id == rb.alert_id)
    store.set_job_state(next(j for j in claimed if j and j.alert_id == ra.alert_id).id, "r",
                        JobState.PENDING)
    end = a.starts_at + timedelta(seconds=90)
    res = store.add_resolution(alert(fingerprint="a" * 16, status="resolved", ends=end))
    assert res.resolved_now and res.cancelled_jobs == 1
    assert store.job_for_alert(ra.alert_id).state is JobState.CANCELLED  # type: ignore[union-attr]
    assert store.alert(ra.alert_id).time_to_resolve_s == pytest.approx(90)  # type: ignore[union-attr]
    again = store.add_resolution(alert(fingerprint="a" * 16, status="resolved", ends=end))
    assert not again.resolved_now and again.cancelled_jobs == 0
    store.add_resolution(alert(fingerprint="b" * 16, instance="10.0.0.2:8000", status="resolved", ends=end))
    job_b = store.job(running.id)
    assert job_b is not None and job_b.state is JobState.RUNNING and job_b.cancel_requested
    assert store.active_instances(since=0) == set()


def test_resolution_of_an_alert_never_seen_firing_is_kept(store: Store) -> None:
    res = store.add_resolution(alert(status="resolved", ends=datetime(2026, 1, 1, 12, 5, tzinfo=timezone.utc)))
    assert res.new and res.resolved_now and store.table_counts()["jobs"] == 0


def test_awaiting_approval_action_is_cancelled_with_its_job(store: Store) -> None:
    res = store.add_firing_alert(alert())
    job = store.claim_job("r", 60)
    assert job is not None
    aid = store.create_action(alert_id=res.alert_id, job_id=job.id, strategy="poke", target="i",
                              mode="approval", why="needs a human")
    store.set_job_state(job.id, "r", JobState.WAITING_APPROVAL, action_id=aid)
    assert store.action(aid).status == "awaiting_approval"  # type: ignore[union-attr]
    out = store.add_resolution(alert(status="resolved"))
    assert out.cancelled_actions == ("poke",)
    act = store.action(aid)
    assert act is not None and act.outcome == "cancelled" and act.status == "finished"


def test_action_events_happen_once_and_outcomes_carry_context(store: Store) -> None:
    res = store.add_firing_alert(alert(failure_type="kv_cache_exhaustion"))
    aid = store.create_action(alert_id=res.alert_id, job_id=res.job_id, strategy="poke",
                              target="10.0.0.1:8000", mode="auto", why="because", confidence=0.5,
                              params={"level": 2}, guards=[{"guard": "cooldown", "ok": True}],
                              state={"alertname": "VllmKvCacheNearlyFull", "target": "10.0.0.1:8000"},
                              errors=["earlier: failure"], metrics_before={"kv": 0.97, "bad": "x"},
                              now=T0)
    assert store.add_action_event(aid, "started", now=T0 + 1)
    assert not store.add_action_event(aid, "started", now=T0 + 2)  # a second runner loses
    assert store.finish_action(aid, Outcome.SUCCESS, detail="ok", result={"ok": True},
                               verification={"ok": True}, metrics_after={"kv": 0.5}, duration_s=3.0,
                               now=T0 + 4)
    assert not store.finish_action(aid, Outcome.FAILURE, now=T0 + 5)
    act = store.action(aid)
    assert act is not None and act.outcome == "success" and act.started_at == T0 + 1
    assert act.metrics_before == {"kv": 0.97} and act.metrics_after == {"kv": 0.5}
    [out] = store.outcomes()
    assert (out.strategy, out.outcome, out.failure_type, out.target) == (
        "poke", "success", "kv_cache_exhaustion", "10.0.0.1:8000")
    assert out.metrics == {"kv": 0.97} and out.errors == ["earlier: failure"] and out.duration_s == 3.0
    assert store.job_for_alert(res.alert_id).action_id == aid  # type: ignore[union-attr]
    # What the guards ask.
    assert store.last_start("poke", "10.0.0.1:8000") == T0 + 1
    assert store.last_start("poke", "other") is None
    assert store.starts_since(T0) == 1 and store.starts_since(T0, exclude_strategies=["poke"]) == 0
    assert [o.outcome for o in store.executed_outcomes("poke", since=T0, limit=5)] == ["success"]


def test_audit_rows_are_never_rewritten(store: Store) -> None:
    res = store.add_firing_alert(alert())
    aid = store.create_action(alert_id=res.alert_id, job_id=res.job_id, strategy="poke",
                              target="t", mode="auto", why="w", now=T0)
    before = store.table_counts()
    with store.engine.connect() as c:
        row_before = c.exec_driver_sql("SELECT * FROM actions").fetchall()
    store.add_action_event(aid, "started")
    store.finish_action(aid, Outcome.FAILURE, detail="boom")
    with store.engine.connect() as c:
        assert c.exec_driver_sql("SELECT * FROM actions").fetchall() == row_before
    after = store.table_counts()
    assert after["action_events"] == before["action_events"] + 2 and after["outcomes"] == 1


def test_store_code_only_updates_coordination_tables() -> None:
    """Append-only by construction: UPDATE and DELETE appear only on jobs, locks, activity."""
    src = "\n".join(p.read_text() for p in sorted(Path(store_mod.__file__).parent.glob("*.py")))
    touched = set(re.findall(r"\b(?:update|delete)\((\w+)\)", src))
    assert touched == {"JobRow", "LockRow", "AlertActivityRow"}, touched
    raw = set(re.findall(r"\"(?:UPDATE|DELETE FROM)\s+(\w+)", src))  # the SQLite fast path's SQL
    assert "alert_activity" in raw
    assert raw <= {"jobs", "locks", "alert_activity"}, raw
    assert ".delete(" not in src.replace("delete(LockRow", "")


def test_secrets_never_reach_the_database(store: Store) -> None:
    hf = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    res = store.add_firing_alert(alert(api_key="sk-live-0123456789abcdefghijklmnop",
                                       note=f"token={hf}"))
    a2 = AlertmanagerAlert.model_validate({
        "status": "firing", "labels": {"alertname": "X"}, "fingerprint": "f2",
        "startsAt": "2026-01-01T00:00:00Z",
        "annotations": {"description": "curl -H 'Authorization: Bearer abc.def.ghi-secret' http://x"}})
    store.add_firing_alert(a2)
    aid = store.create_action(alert_id=res.alert_id, job_id=None, strategy="s", target="t",
                              mode="auto", why=f"used {hf}", params={"api_token": "p4ss-w0rd-xyz"},
                              errors=["401 with password=hunter2hunter2"])
    store.finish_action(aid, Outcome.FAILURE, detail=f"failed with {hf}",
                        result={"headers": {"Authorization": "Bearer zzz-secret-zzz"}})
    store.add_action_event(aid, "approved", {"by": "alice", "comment": f"ok, key {hf}"})
    store.set_kill_switch(True, by="ops", reason=f"leaked {hf}")
    text = " ".join(store.iter_all_text())
    for secret in (hf, "sk-live-0123456789", "abc.def.ghi-secret", "p4ss-w0rd-xyz", "hunter2hunter2",
                   "zzz-secret-zzz"):
        assert secret not in text, secret
    assert "REDACTED" in text and "curl" in text  # redacted, not dropped


def test_claim_jobs_takes_a_batch_and_each_job_goes_to_one_claimer(store: Store) -> None:
    for i in range(30):
        store.add_firing_alert(alert(fingerprint=f"fp{i:02d}", instance=f"10.0.0.{i}:8000"))
    got: dict[int, list[Any]] = {}
    barrier = threading.Barrier(4)

    def claim(i: int) -> None:
        barrier.wait()
        got[i] = []
        while batch := store.claim_jobs(f"runner-{i}", 60, limit=7):
            assert len(batch) <= 7 and all(j.owner == f"runner-{i}" and j.attempts == 1 for j in batch)
            got[i] += batch

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [j.id for batch in got.values() for j in batch]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 30  # all taken, none twice
    assert store.claim_jobs("late", 60, limit=5) == []
    # Lapsed leases come back, oldest first, at most ``limit`` at a time.
    again = store.claim_jobs("late", 60, now=time.time() + 120, limit=5)
    assert [j.id for j in again] == sorted(ids)[:5] and {j.attempts for j in again} == {2}


def test_claim_job_is_exclusive_under_concurrency(store: Store) -> None:
    store.add_firing_alert(alert())
    got: list[Any] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        got.append(store.claim_job(f"runner-{i}", 60))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [j for j in got if j is not None]
    assert len(winners) == 1 and winners[0].attempts == 1
    # Only its owner moves it; a lapsed lease hands it to someone else.
    assert not store.set_job_state(winners[0].id, "someone-else", JobState.DONE)
    assert store.claim_job("late", 60) is None
    retaken = store.claim_job("late", 60, now=time.time() + 120)
    assert retaken is not None and retaken.owner == "late" and retaken.attempts == 2
    assert not store.set_job_state(retaken.id, winners[0].owner or "", JobState.DONE)
    assert store.set_job_state(retaken.id, "late", JobState.DONE)
    assert store.job_counts()["done"] == 1


def test_same_alert_from_many_threads_is_one_alert(store: Store) -> None:
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def deliver() -> None:
        barrier.wait()
        results.append(store.add_firing_alert(alert()))

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.new for r in results) == 1 and len({r.alert_id for r in results}) == 1
    assert store.table_counts()["jobs"] == 1


def test_leases(store: Store) -> None:
    assert store.acquire_lock("target:a", "one", 10, now=100)
    assert not store.acquire_lock("target:a", "two", 10, now=105)
    assert store.lock_holder("target:a", now=105) == "one"
    assert store.acquire_lock("target:a", "one", 10, now=106)  # renew
    assert store.acquire_lock("target:a", "two", 10, now=117)  # expired: taken over
    store.release_lock("target:a", "one")  # not the holder: no effect
    assert store.lock_holder("target:a", now=118) == "two"
    store.release_lock("target:a", "two")
    assert store.lock_holder("target:a", now=118) is None


def test_kill_switch_latest_event_wins(store: Store) -> None:
    assert store.kill_switch().engaged is False
    store.set_kill_switch(True, by="ops", reason="incident")
    ks = store.kill_switch()
    assert ks.engaged and ks.by == "ops" and ks.reason == "incident" and ks.source == "api"
    store.set_kill_switch(False, by="ops")
    assert store.kill_switch().engaged is False
    assert store.table_counts()["kill_switch_events"] == 2


def test_outcomes_feed_in_order_and_errors_per_target(store: Store) -> None:
    for i, outcome in enumerate([Outcome.FAILURE, Outcome.SUCCESS, Outcome.DRY_RUN, Outcome.NO_EFFECT]):
        aid = store.create_action(alert_id=None, job_id=None, strategy="poke", target="t1",
                                  mode="auto", why="w", now=T0 + i)
        store.finish_action(aid, outcome, detail=f"d{i}", now=T0 + i)
    all_ = store.outcomes()
    assert [o.outcome for o in all_] == ["failure", "success", "dry_run", "no_effect"]
    assert [o.outcome for o in store.outcomes(after_id=all_[1].id)] == ["dry_run", "no_effect"]
    assert [o.outcome for o in store.executed_outcomes("poke", since=T0, limit=2)] == ["no_effect", "success"]
    assert store.recent_errors("t1", since=T0) == ["poke: no_effect: d3", "poke: failure: d0"]
    assert store.recent_errors("t2", since=T0) == []


def test_schema_creation_is_idempotent_and_replicas_share_it(db_url: str) -> None:
    made: list[Store] = []
    barrier = threading.Barrier(3)

    def start(name: str) -> None:  # replicas starting at the same moment on an empty database
        barrier.wait()
        made.append(Store(db_url, replica_id=name))

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 3
    for extra in made[2:]:
        extra.close()
    a, b = made[0], made[1]
    try:
        a.add_firing_alert(alert())
        assert b.add_firing_alert(alert()).new is False
        assert b.ping()
    finally:
        a.close()
        b.close()


def test_webhook_receipts_are_recorded(store: Store) -> None:
    hook = AlertmanagerWebhook.model_validate({
        "version": "4", "groupKey": "{}:{alertname=\"x\"}", "status": "firing", "receiver": "r",
        "truncatedAlerts": 2, "alerts": [alert().model_dump(by_alias=True, mode="json")]})
    store.record_webhook(hook)
    assert store.table_counts()["webhooks"] == 1


def test_an_older_database_gets_the_new_columns(tmp_path: Path) -> None:
    """A receiver database made before jobs.run_after / jobs.rechecks existed keeps working."""
    import sqlite3

    db = tmp_path / "old.db"
    Store(f"sqlite:///{db}").close()
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE jobs DROP COLUMN run_after")
    con.execute("ALTER TABLE jobs DROP COLUMN rechecks")
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    try:
        cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(jobs)")}
        assert {"run_after", "rechecks"} <= cols
        assert store.claim_job("me", 60.0) is None  # the claim query uses them
    finally:
        store.close()
