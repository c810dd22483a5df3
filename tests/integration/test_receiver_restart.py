"""Restarts: start-up warm-up before the first webhook, pending work resumed from the store,
the worker held back during the retry wave, an interrupted action never re-run, the learner
replayed from stored outcomes, and a rolling restart on one port (``--reuse-port``) that
refuses no webhook."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.receiver_support import (CLI, I1, TOKEN, Env, StaticMetrics, am_alert, am_payload, cli_files,
                                    role_client, run)
from vllm_otel.mitigate.records import Outcome
from vllm_otel.mitigate.store import Store
from vllm_otel.testing.processes import free_port


def test_worker_parts_are_warmed_at_start_up_before_the_first_webhook(tmp_path: Path) -> None:
    """The actuator's and metrics source's one-time costs (imports, the CA bundle: ~30 ms of it one
    C call that holds the GIL) are paid in the app's start-up, before uvicorn listens: not on the
    worker's thread later, where they stalled the webhooks in flight (benchmarks/README.md), and
    not inside the first job. Once only; a failing warm-up only logs and the job still runs."""
    order: list[str] = []

    class WarmMetrics(StaticMetrics):
        def warm_up(self) -> None:
            order.append(f"metrics warmed after {len(env.actuator.calls)} actions")

    env = Env(tmp_path, metrics=WarmMetrics({"kv": 0.5}), start_worker=True,
              worker={"start_hold_s": 5.0, "poll_s": 0.05}, guards={"cooldown_s": 0})
    storm = [True]
    env.receiver.worker.foreground_busy = lambda: storm[0]

    def broken() -> None:
        order.append("actuator warmed")
        raise RuntimeError("no CA bundle")

    env.actuator.warm_up = broken  # type: ignore[attr-defined]
    with role_client(env.app) as c:
        order.append("listening")
        assert c.post("/webhook", json=am_payload(am_alert())).status_code == 202
        time.sleep(0.3)
        order.append("wave over")  # the worker held back while the intake was busy
        storm[0] = False
        deadline = time.monotonic() + 10
        while not env.actuator.calls and time.monotonic() < deadline:
            time.sleep(0.01)
    assert order == ["actuator warmed", "metrics warmed after 0 actions", "listening", "wave over"]
    assert env.actuator.calls == [(I1, "poke", {"level": 1})]


def test_real_warm_up_loads_what_a_first_scrape_would() -> None:
    import subprocess
    import sys

    code = ("import sys; from vllm_otel.mitigate.actuators import ScrapeMetricsSource, _tls_context; "
            "ScrapeMetricsSource().warm_up(); "
            "print(all(m in sys.modules for m in ('httpcore', 'h11', 'anyio._backends._asyncio', "
            "'prometheus_client.parser')), _tls_context.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "1"], out.stderr


def test_restart_resumes_pending_work(tmp_path: Path) -> None:
    """Accept with one app (worker never runs), stop it; a new app on the same SQLite file acts."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    first = Env(tmp_path, db_url=db, start_worker=False)
    with role_client(first.app) as c:
        assert c.post("/webhook", json=am_payload(am_alert())).status_code == 202
    first.store.close()
    assert first.actuator.calls == []

    second = Env(tmp_path, db_url=db, start_worker=True)
    with role_client(second.app) as c:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            acts = c.get("/actions").json()["actions"]
            if acts and acts[0]["outcome"]:
                break
            time.sleep(0.05)
        assert acts[0]["outcome"] == "success", acts
        assert c.get("/healthz").json()["worker"] == "running"
    assert second.actuator.calls == [(I1, "poke", {"level": 1})]


@pytest.mark.parametrize("storm_s, starts_after_s", [(60.0, 1.5), (0.6, 0.6)])
def test_restarted_worker_waits_for_the_retry_wave(tmp_path: Path, storm_s: float,
                                                   starts_after_s: float) -> None:
    """worker.start_hold_s: a receiver restarted with work pending holds its worker while webhooks
    keep arriving (Alertmanager's retries come all at once), at most start_hold_s; once they
    stop it starts at once. The pending job is done either way."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    first = Env(tmp_path, db_url=db)  # no worker: the job stays pending, as after a crash
    assert run(first.post(am_payload(am_alert()))).status_code == 202
    first.store.close()
    env = Env(tmp_path, db_url=db, start_worker=True, worker={"start_hold_s": 1.5, "poll_s": 0.05},
              guards={"cooldown_s": 0})
    t0 = time.monotonic()
    env.receiver.worker.foreground_busy = lambda: time.monotonic() - t0 < storm_s
    with role_client(env.app):
        while not env.actuator.calls and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        took = time.monotonic() - t0
    assert env.actuator.calls == [(I1, "poke", {"level": 1})]
    assert starts_after_s - 0.05 <= took <= starts_after_s + 1.0, took


def test_action_interrupted_by_a_stop_is_not_rerun(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    first = Env(tmp_path, db_url=db)
    first.actuator.gate = asyncio.Event()  # the action hangs ...

    async def go() -> None:
        await first.post(am_payload(am_alert()))
        task = asyncio.create_task(first.receiver.drain())
        while not first.actuator.entered.is_set():
            await asyncio.sleep(0.01)
        await first.receiver.shutdown(grace_s=0.05)  # ... and the receiver stops mid-action
        await asyncio.gather(task, return_exceptions=True)
    run(go())
    first.store.close()
    second = Env(tmp_path, db_url=db)
    run(second.receiver.drain())
    assert second.actuator.calls == []
    [act] = run(second.actions())
    assert act["outcome"] == "interrupted" and "not re-run" in act["detail"]
    assert second.store.lock_holder("target:" + I1) is None


def test_receiver_replays_stored_outcomes_into_a_fresh_learner(tmp_path: Path) -> None:
    """A restarted receiver's learner knows what failed before the restart (via the store)."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(db)
    aid = store.create_action(alert_id=None, job_id=None, strategy="poke", target="10.0.0.1:8000",
                              mode="auto", why="before the restart",
                              state={"alertname": "VllmKvCacheNearlyFull", "target": "10.0.0.1:8000"})
    store.add_action_event(aid, "started")
    store.finish_action(aid, Outcome.FAILURE, detail="refused")
    store.close()

    env = Env(tmp_path, db_url=db, guards={"cooldown_s": 0})
    assert env.receiver.sync_learner() == 1
    assert env.receiver.learner.failed_recently("poke", "10.0.0.1:8000")
    run(env.post(am_payload(am_alert())))
    run(env.receiver.drain())
    # poke failed recently on this target, so the next candidate (restart, kv 0.5) runs.
    assert [c[1] for c in env.actuator.calls] == ["restart"]
    assert "skipped poke" in run(env.actions())[0]["why"]

    async def learner(token: str | None = TOKEN) -> httpx.Response:  # TOKEN: each role its own
        async with env.client(token) as c:
            return await c.get("/learner")

    assert run(learner(None)).status_code == 401
    body = run(learner()).json()
    assert body["learner"] == "UCBLearner"  # the default (make_learner)
    assert sorted((s["strategy"], s["attempts"], s["successes"]) for s in body["stats"]) == [
        ("poke", 1, 0), ("restart", 1, 1)]


def test_rolling_restart_with_reuse_port_refuses_nothing(tmp_path: Path) -> None:
    """--reuse-port: a second receiver on the same port and store starts while the first still
    serves; then the first stops. Webhooks sent all along (retried on a transport error, as
    Alertmanager does) are all answered 202 and stored, and the new receiver serves alone after.
    Without --reuse-port on the running receiver, the second one says so and exits."""
    import sys

    from vllm_otel.testing.processes import ManagedProcess

    token_file, policy_file = cli_files(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def receiver(name: str, *extra: str) -> ManagedProcess:
        return ManagedProcess(name, [
            sys.executable, "-c", CLI, "receiver", "--config", str(policy_file), "--port", str(port),
            "--token-file", str(token_file), "--replica-id", name,
            "--db-url", f"sqlite:///{tmp_path / 'r.db'}", *extra], tmp_path / f"{name}.log")

    def wait_ready(proc: ManagedProcess) -> None:
        # Listening follows the app's start-up at once (uvicorn logs no address for a socket
        # it was handed).
        proc.wait_log("Application startup complete", timeout_s=30)

    plain = receiver("plain").start()
    try:
        wait_ready(plain)
        late = receiver("late", "--reuse-port").start()
        deadline = time.monotonic() + 30
        while late.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not late.alive(), "started on a port held without SO_REUSEPORT"
        assert "cannot listen on" in late.log_tail() and "SO_REUSEPORT" in late.log_tail()
    finally:
        plain.stop()

    old = receiver("old", "--reuse-port").start()
    new = receiver("new", "--reuse-port")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sent: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def sender() -> None:  # one new alert every 10 ms, each retried until it is accepted
        with httpx.Client(timeout=10) as c:
            i = 0
            while not stop.is_set():
                a = am_alert(instance=I1, seq=f"r{i}")
                for _ in range(50):
                    try:
                        r = c.post(f"{url}/webhook", json=am_payload(a), headers=auth)
                        assert r.status_code == 202, r.text
                        break
                    except httpx.TransportError as e:
                        errors.append(type(e).__name__)
                        time.sleep(0.05)
                else:
                    raise AssertionError(f"alert r{i} never accepted")
                sent.append(a["fingerprint"])
                i += 1
                time.sleep(0.01)

    try:
        wait_ready(old)
        t = threading.Thread(target=sender)
        t.start()
        time.sleep(0.5)
        new.start()
        wait_ready(new)  # both serve now
        time.sleep(0.3)
        old.stop()
        time.sleep(0.5)
        stop.set()
        t.join(30)
        assert not t.is_alive()
        assert httpx.get(f"{url}/healthz", timeout=5).json()["replica"] == "new"
    finally:
        stop.set()
        old.stop()
        new.stop()
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        stored = {a.fingerprint for a in store.alerts(limit=10_000)}
    finally:
        store.close()
    assert len(sent) > 50 and set(sent) <= stored
    # Connections the old receiver had accepted but not served when it stopped are reset, and
    # the client sends again; there is no window in which the port refuses connections.
    assert errors.count("ConnectError") == 0, errors
