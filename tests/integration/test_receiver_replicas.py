"""Several replicas on one store: two receivers on a real PostgreSQL take each alert once and
share the kill switch; a dead runner's lease expires and another takes its job."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.receiver_support import I1, I2, I3, Env, am_alert, am_payload, run, second_firing


@pytest.fixture(scope="module")
def postgres():  # noqa: ANN201
    from vllm_otel.testing.postgres import PostgresNotAvailable, PostgresServer

    try:
        server = PostgresServer()
    except PostgresNotAvailable as e:
        pytest.fail(str(e))
    with server:
        yield server


def test_two_replicas_on_postgres_take_each_alert_once(tmp_path: Path, postgres) -> None:  # noqa: ANN001
    r1 = Env(tmp_path, db_url=postgres.url)
    r2 = Env(tmp_path, db_url=postgres.url)
    assert r1.store.replica_id != r2.store.replica_id
    alerts = [am_alert(instance=i) for i in (I1, I2)]

    async def go() -> None:
        # Alertmanager HA: both peers deliver the same group, one to each replica, at once.
        res = await asyncio.gather(r1.post(am_payload(*alerts)), r2.post(am_payload(*alerts)),
                                   r1.post(am_payload(*alerts)))
        assert all(r.status_code == 202 for r in res)
        assert sum(r.json()["new"] for r in res) == 2
        await asyncio.gather(r1.receiver.drain(), r2.receiver.drain())
    run(go())
    calls = r1.actuator.calls + r2.actuator.calls
    assert sorted(c[0] for c in calls) == [I1, I2]
    counts = r1.store.table_counts()
    assert counts["alerts"] == 2 and counts["jobs"] == 2 and counts["outcomes"] == 2
    acts = run(r2.actions())
    assert {a["outcome"] for a in acts} == {"success"}
    # The kill switch set through one replica stops the other.
    r2.store.set_kill_switch(True, by="ops", reason="shared")
    run(r1.post(am_payload(second_firing(I3))))
    run(r1.receiver.drain())
    assert len(r1.actuator.calls + r2.actuator.calls) == 2
    assert run(r1.actions())[0]["outcome"] == "blocked"


def test_lease_expiry_hands_a_dead_runners_job_to_another(tmp_path: Path) -> None:
    env = Env(tmp_path)
    run(env.post(am_payload(am_alert(instance=I1), am_alert(instance=I2))))
    # A runner took the first job and died before deciding: another decides and acts.
    job = env.store.claim_job("dead-replica", lease_s=0.3)
    assert job is not None
    # A runner took the second job, started the action, and died (no chance to record anything).
    job2 = env.store.claim_job("dead-replica", lease_s=0.3)
    assert job2 is not None and job2.id != job.id
    assert env.store.claim_job("live-replica", lease_s=60) is None  # leases still held
    aid = env.store.create_action(alert_id=job2.alert_id, job_id=job2.id, strategy="poke",
                                  target=I2, mode="auto", why="test")
    assert env.store.acquire_lock("target:" + I2, f"dead-replica#job{job2.id}", 600)
    assert env.store.add_action_event(aid, "started")
    time.sleep(0.35)
    run(env.receiver.drain())
    assert env.actuator.calls == [(I1, "poke", {"level": 1})]  # I2's half-done action not re-run
    outcomes = {a["alert"]["instance"]: a["outcome"] for a in run(env.actions())}
    assert outcomes == {I1: "success", I2: "interrupted"}
    assert env.store.lock_holder("target:" + I2) is None  # the dead runner's target lease freed
