"""The webhook intake: durable before the 202, group commit (inline while the write lock is
free, else batched on the writer thread), resends and HA duplicates stored once, each alert of
a group on its own, unmapped and record-only alerts recorded without an action."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.receiver_support import I1, I2, Env, am_alert, am_payload, resolved, run
from vllm_otel.mitigate.records import JobState


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_durable_before_202_then_background_action(env: Env) -> None:
    a = am_alert()
    r = run(env.post(am_payload(a)))
    assert r.status_code == 202 and r.json()["new"] == 1
    # Persisted, not yet acted on: the 202 did not wait for the work.
    assert env.actuator.calls == []
    job = env.store.job_for_alert(env.store.alerts()[0].id)
    assert job is not None and job.state is JobState.PENDING
    assert run(env.receiver.drain()) == 1
    assert env.actuator.calls == [(I1, "poke", {"level": 1})]
    [act] = run(env.actions())
    assert act["strategy"] == "poke" and act["outcome"] == "success" and act["mode"] == "auto"
    assert act["alert"]["fingerprint"] == a["fingerprint"] and act["alert"]["instance"] == I1
    assert "chose poke" in act["why"] and act["metrics_before"] == {"kv": 0.5}
    assert act["metrics_after"] == {"kv": 0.5} and act["verification"]["ok"] is True
    assert {g["guard"] for g in act["guards"]} >= {"kill_switch", "blast_radius", "cooldown",
                                                   "circuit_breaker", "rate_limit", "one_per_target",
                                                   "target_allowed", "precondition"}
    assert act["timings"]["started_at"] and act["timings"]["finished_at"]
    assert env.mitigations("poke", "success") == 1


def count_batches(env: Env) -> list[int]:
    """The size of every batch the store ingests from now on."""
    batches: list[int] = []
    real_ingest = env.store.ingest

    def ingest(notes: Any) -> Any:
        out = real_ingest(notes)
        batches.append(len(notes))
        return out

    env.store.ingest = ingest  # type: ignore[method-assign]
    return batches


async def post_together(env: Env, alerts: list[dict[str, Any]]) -> None:
    """POST each alert at once; each must be answered 202 and be in the database by then."""
    async with env.client() as c:
        async def one(a: dict[str, Any]) -> None:
            r = await c.post("/webhook", json=am_payload(a))
            assert r.status_code == 202 and r.json()["new"] == 1
            # Durable before the answer: the alert is in the database already.
            assert any(x.fingerprint == a["fingerprint"] for x in env.store.alerts(limit=1000))
        await asyncio.gather(*(one(a) for a in alerts))


def test_concurrent_webhooks_share_commits_and_each_202_means_stored(env: Env) -> None:
    """Group commit: webhooks arriving together are stored in one transaction, and every 202
    comes after the commit that holds its alert."""
    batches = count_batches(env)
    env.receiver.intake._inline = None  # the writer thread only (as on PostgreSQL)
    run(post_together(env, [am_alert(instance=I1, seq=str(i)) for i in range(60)]))
    assert sum(batches) == 60 and max(batches) > 1, batches
    assert env.store.table_counts()["alerts"] == 60 and env.store.table_counts()["jobs"] == 60
    assert env.metric("vllm_otel_receiver_webhook_duration_seconds_count") == 60


def test_webhooks_commit_inline_while_the_write_lock_is_free_else_in_groups(env: Env) -> None:
    """SQLite without an fsync per commit: a webhook on its own is stored on the event loop's
    thread when nothing else writes; while another thread (the worker) holds the write lock,
    webhooks queue for the writer thread and share its commits. Either way each 202 comes after
    its commit."""
    batches = count_batches(env)
    intake = env.receiver.intake
    for i in range(10):  # one at a time: each is stored inline
        run(post_together(env, [am_alert(instance=I1, seq=f"a{i}")]))
    assert intake.inline_commits == 10 and batches == [1] * 10

    held, release = threading.Event(), threading.Event()

    def writer_elsewhere() -> None:  # a long write of another thread, as the worker's would be
        with env.store.write_now() as free:
            assert free
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer_elsewhere)
    t.start()
    assert held.wait(5)
    threading.Timer(0.3, release.set).start()
    batches.clear()
    run(post_together(env, [am_alert(instance=I1, seq=f"b{i}") for i in range(30)]))
    t.join(5)
    assert intake.inline_commits == 10, "a webhook wrote while another thread held the lock"
    assert sum(batches) == 30 and max(batches) > 1, batches
    assert env.store.table_counts()["alerts"] == 40


def test_a_foreign_write_lock_never_blocks_the_event_loop(env: Env) -> None:
    """Another process holding the SQLite write lock (a second receiver on the same file, a
    maintenance script): an inline commit must not sleep in SQLite's busy handler on the event
    loop's thread. The webhook waits on the writer thread instead, the loop keeps serving, and
    the 202 comes once the lock is free, with the alert stored."""
    import sqlite3

    db = env.store.engine.url.database
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        async def go() -> tuple[float, int]:
            async with env.client() as c:
                post = asyncio.create_task(c.post("/webhook", json=am_payload(am_alert(instance=I1))))
                worst = 0.0
                for _ in range(20):  # 0.4 s of 20 ms ticks: how late does the loop run them?
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.02)
                    worst = max(worst, time.perf_counter() - t0 - 0.02)
                assert not post.done(), "answered while the database was locked"
                other.execute("COMMIT")
                r = await asyncio.wait_for(post, 15)
                return worst, r.status_code
        worst, code = run(go())
    finally:
        if other.in_transaction:
            other.execute("COMMIT")
        other.close()
    assert code == 202
    assert worst < 0.2, f"the event loop stalled {worst:.2f} s"
    assert env.receiver.intake.inline_commits == 0
    assert [a.instance for a in env.store.alerts()] == [I1]


def test_a_failing_batch_is_retried_notification_by_notification(env: Env) -> None:
    """One notification the store rejects makes only its own POST a 503 (Alertmanager retries it)."""
    real_ingest = env.store.ingest

    def ingest(notes: Any) -> Any:
        if any(n.hook.alerts[0].labels.get("poison") for n in notes):
            raise RuntimeError("constraint violated")
        return real_ingest(notes)

    env.store.ingest = ingest  # type: ignore[method-assign]
    good = [am_alert(instance=I1, seq=str(i)) for i in range(20)]
    bad = am_alert(instance=I2, poison="1")

    async def go() -> list[int]:
        async with env.client() as c:
            rs = await asyncio.gather(*(c.post("/webhook", json=am_payload(a)) for a in [*good, bad]))
            return [r.status_code for r in rs]
    codes = run(go())
    assert codes == [202] * 20 + [503]
    assert env.store.table_counts()["alerts"] == 20
    assert env.metric("vllm_otel_receiver_store_errors_total") == 1


def test_group_resends_and_ha_duplicates_act_once(env: Env) -> None:
    a, b = am_alert(instance=I1), am_alert(instance=I2)
    for _ in range(3):  # Alertmanager resends the whole group on every change / repeat_interval
        assert run(env.post(am_payload(a, b))).status_code == 202
    run(env.receiver.drain())
    assert sorted(c[0] for c in env.actuator.calls) == [I1, I2]
    assert env.metric("vllm_otel_receiver_alerts_total", status="firing", result="duplicate") == 4
    # A new firing of the same series (new startsAt) is a new alert.
    a2 = dict(a, startsAt=(datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat())
    r = run(env.post(am_payload(a2)))
    assert r.json()["new"] == 1


def test_each_alert_has_its_own_status_and_resolve_cancels_pending(env: Env) -> None:
    a, b = am_alert(instance=I1), am_alert(instance=I2)
    run(env.post(am_payload(a, b)))
    # Group status says firing, but alert a is resolved: a's pending work is cancelled.
    r = run(env.post(am_payload(resolved(a, after_s=42), b)))
    assert r.status_code == 202 and r.json()["resolved"] == 1 and r.json()["cancelled"] == 1
    run(env.receiver.drain())
    assert [c[0] for c in env.actuator.calls] == [I2]
    rec = env.store.alert_by_key(env.store.alerts()[-1].key)
    assert rec is not None and rec.time_to_resolve_s == pytest.approx(42, abs=0.01)
    # The resend of the resolution changes nothing.
    assert run(env.post(am_payload(resolved(a, after_s=42)))).json()["resolved"] == 0


def test_unmapped_alert_recorded_no_action(env: Env) -> None:
    r = run(env.post(am_payload(am_alert("SomethingElse"))))
    assert r.status_code == 202 and r.json()["unmapped"] == 1
    run(env.receiver.drain())
    assert env.actuator.calls == []
    [act] = run(env.actions())
    assert act["outcome"] == "unmapped" and act["strategy"] is None
    assert "SomethingElse" in act["why"]
    assert env.mitigations("none", "unmapped") == 1
    assert env.store.table_counts()["jobs"] == 0


def test_record_only_rule_and_target_allow_list(env: Env) -> None:
    run(env.post(am_payload(am_alert("RecordOnly"), am_alert(instance="evil.example:8000"))))
    run(env.receiver.drain())
    assert env.actuator.calls == []
    by_inst = {a["alert"]["instance"]: a for a in run(env.actions())}
    assert by_inst[I1]["outcome"] == "skipped"
    other = by_inst["evil.example:8000"]
    assert other["outcome"] == "blocked" and "not a configured target" in other["why"]
