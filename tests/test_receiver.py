"""The mitigation receiver over HTTP: auth, validation, durability, dedupe, guards, approval,
restart, several replicas on a real PostgreSQL, a real uvicorn server, a real Alertmanager.

What is real here: the Starlette app, the SQLite / PostgreSQL store, uvicorn, Alertmanager 0.25,
the escalation hook (a real HTTP server). What is not: vLLM. Strategies act through the
``Actuator`` protocol, and these tests put a *recording actuator at that boundary* (it records
each ``call(target, action, params)`` and can be told to fail or to block); the test strategies
below are small real strategies that go through it. Metrics come through the ``MetricsSource``
protocol from a static source whose timestamps we control.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx
import pytest
import yaml
from starlette.testclient import TestClient

from vllm_otel.learn.learner import RuleBasedLearner
from vllm_otel.mitigate.models import JobState, Outcome, Target
from vllm_otel.mitigate.policy import Policy
from vllm_otel.mitigate.receiver import create_app
from vllm_otel.mitigate.strategies import (REGISTRY, ActionResult, ActuatorError, Check,
                                           MetricsSnapshot, Strategy, StrategyParams, Verification)
from vllm_otel.mitigate.store import Store
from vllm_otel.testing.processes import free_port
from vllm_otel.testing.services import UvicornThread
from vllm_otel.testing.webhook import WebhookSink

TOKEN = "receiver-test-token-4f9a8b7c6d5e"  # the intake token: Alertmanager's, webhooks only
OPERATORS = {"alice": "operator-alice-credential-0a1b2c3d", "bob": "operator-bob-credential-5f6a7b8c"}


class RoleAuth:
    """What each caller holds: Alertmanager the intake token (POST /webhook), an operator (alice
    unless told) their own credential for everything else. A callable, the auth form both httpx
    and the test client's httpx accept."""

    def __init__(self, operator: str = "alice") -> None:
        self.operator = operator

    def __call__(self, request: Any) -> Any:
        token = TOKEN if request.url.path == "/webhook" else OPERATORS[self.operator]
        request.headers["Authorization"] = f"Bearer {token}"
        return request


ROLES = RoleAuth()
OP_AUTH = {"Authorization": f"Bearer {OPERATORS['alice']}"}
I1, I2, I3 = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


# --- the boundary: a recording actuator and a static metrics source ----------------------------------

class RecordingActuator:
    """Records every call at the Actuator boundary; can fail or block on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fail = False
        self.gate: asyncio.Event | None = None  # set: calls wait for it
        self.entered = threading.Event()

    async def call(self, target: Target, action: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        self.calls.append((target.instance, action, dict(params)))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ActuatorError(f"{action} refused by {target.instance}")
        return {"ok": True}


class StaticMetrics:
    def __init__(self, values: dict[str, float], age_s: float = 0.0) -> None:
        self.values = values
        self.age_s = age_s

    async def snapshot(self, target: Target) -> MetricsSnapshot | None:
        return MetricsSnapshot(values=self.values, at=time.time() - self.age_s)


# --- small real strategies for the tests ---------------------------------------------------------------

class PokeParams(StrategyParams):
    level: int = 1


class Poke(Strategy):
    """Ask the engine to poke itself (test strategy, reversible)."""

    name = "poke"
    invasiveness = 10
    Params = PokeParams

    async def execute(self, ctx, actuator):  # noqa: ANN001, ANN201
        await actuator.call(ctx.target, "poke", {"level": self.params.level})
        return ActionResult(ok=True, detail="poked")

    async def verify(self, ctx):  # noqa: ANN001, ANN201
        after = ctx.metrics_after or {}
        ok = after.get("kv", 0.0) < 0.9
        return Verification(ok=ok, detail=f"kv after {after.get('kv')}")


class Restart(Strategy):
    """Restart the engine (test strategy, invasive)."""

    name = "restart"
    invasiveness = 80

    def applies(self, ctx):  # noqa: ANN001, ANN201
        return Check(ctx.metrics_before.get("kv", 0.0) >= 0.5, "only when kv >= 0.5")

    async def execute(self, ctx, actuator):  # noqa: ANN001, ANN201
        await actuator.call(ctx.target, "restart", {})
        return ActionResult(ok=True)

    async def verify(self, ctx):  # noqa: ANN001, ANN201
        return Verification(ok=True)


REG = REGISTRY.copy()
REG.register(Poke)
REG.register(Restart)


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def policy_dict(sink_url: str = "http://127.0.0.1:9/unused", **over: Any) -> dict[str, Any]:
    base = {
        "targets": [{"instance": I1}, {"instance": I2}, {"instance": I3}],
        "default_mode": "auto",
        "rules": [
            {"alertname": "VllmKvCacheNearlyFull", "strategies": ["poke", "restart"]},
            {"alertname": "NeedsHuman", "strategies": ["escalate_to_human"]},
            {"alertname": "RecordOnly", "strategies": []},
        ],
        "strategies": {"escalate_to_human": {"mode": "auto", "cooldown_s": 0,
                                             "params": {"url": sink_url, "timeout_s": 5}}},
        # 2 of 3 targets alerting is fine for most tests; 3 of 3 stops (blast radius).
        "guards": {"cooldown_s": 300, "blast_radius": {"max_affected_fraction": 0.7}},
        "worker": {"poll_s": 0.05, "verify_delay_s": 0, "action_timeout_s": 5, "lease_s": 60},
    }
    return deep_merge(base, over)


def am_alert(name: str = "VllmKvCacheNearlyFull", instance: str | None = I1, *,
             status: str = "firing", starts: datetime | None = None, ends: datetime | None = None,
             **labels: str) -> dict[str, Any]:
    lab = {"alertname": name, **({"instance": instance} if instance else {}), "severity": "warning",
           **labels}
    fp = hashlib.sha256(json.dumps(lab, sort_keys=True).encode()).hexdigest()[:16]
    starts = starts or datetime.now(timezone.utc)
    return {"status": status, "labels": lab, "annotations": {"summary": f"{name} test"},
            "startsAt": starts.isoformat().replace("+00:00", "Z"),
            "endsAt": (ends.isoformat().replace("+00:00", "Z") if ends else "0001-01-01T00:00:00Z"),
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": fp}


def am_payload(*alerts: dict[str, Any], truncated: int = 0, **extra: Any) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {"receiver": "vllm-otel", "status": status, "alerts": list(alerts),
            "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
            "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
            "version": "4", "groupKey": '{}:{alertname="x"}', "truncatedAlerts": truncated, **extra}


def resolved(alert: dict[str, Any], after_s: float = 30.0) -> dict[str, Any]:
    a = dict(alert, status="resolved")
    start = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00"))
    a["endsAt"] = (start + timedelta(seconds=after_s)).isoformat().replace("+00:00", "Z")
    return a


class Env:
    """One receiver app on a store, with its recording actuator."""

    def __init__(self, tmp_path: Path, *, db_url: str | None = None, metrics: Any = None,
                 start_worker: bool = False, learner: Any = None, **policy_over: Any) -> None:
        self.store = Store(db_url or f"sqlite:///{tmp_path / 'receiver.db'}")
        self.policy = Policy.from_mapping(policy_dict(**policy_over), REG)
        self.actuator = RecordingActuator()
        self.app = create_app(self.policy, self.store, actuator=self.actuator,
                              metrics_source=metrics if metrics is not None
                              else StaticMetrics({"kv": 0.5}),
                              learner=learner, token=TOKEN, operators=OPERATORS,
                              start_worker=start_worker)
        self.receiver = self.app.state.receiver

    def client(self, token: str | None = TOKEN, *, operator: str = "alice") -> httpx.AsyncClient:
        """``token`` TOKEN (the default): each route gets its role's credential (:class:`RoleAuth`);
        else exactly this bearer token (None: none) on every request."""
        if token == TOKEN:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                     base_url="http://receiver", auth=RoleAuth(operator))
        return self.only(token) if token else httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://receiver")

    def only(self, token: str) -> httpx.AsyncClient:
        """A client that sends exactly ``token`` on every request, whatever the route."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://receiver",
                                 headers={"Authorization": f"Bearer {token}"})

    async def post(self, payload: Any, **kw: Any) -> httpx.Response:
        async with self.client() as c:
            return await c.post("/webhook", json=payload, **kw)

    async def actions(self, **params: Any) -> list[dict[str, Any]]:
        async with self.client() as c:
            r = await c.get("/actions", params=params)
            assert r.status_code == 200, r.text
            return r.json()["actions"]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.receiver.metrics.registry.get_sample_value(name, labels)

    def mitigations(self, strategy: str, outcome: str) -> float:
        return self.metric("vllm_otel_mitigations_total", strategy=strategy, outcome=outcome) or 0.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def role_client(app: Any) -> TestClient:
    c = TestClient(app)
    c.auth = ROLES
    return c


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


# --- HTTP contract -----------------------------------------------------------------------------------

def test_auth_missing_is_401_wrong_is_403(env: Env) -> None:
    async def go() -> None:
        async with env.client(token=None) as c:
            r = await c.post("/webhook", json=am_payload(am_alert()))
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = await c.post("/webhook", json=am_payload(am_alert()),
                             headers={"Authorization": f"Basic {TOKEN}"})
            assert r.status_code == 401
            assert (await c.get("/actions")).status_code == 401
        async with env.client(token="not-the-token") as c:
            assert (await c.post("/webhook", json=am_payload(am_alert()))).status_code == 403
            assert (await c.post("/killswitch", json={"engaged": True})).status_code == 403
        async with env.client() as c:
            assert (await c.post("/webhook", json=am_payload(am_alert()))).status_code == 202
            # Health and metrics stay open for probes and Prometheus.
        async with env.client(token=None) as c:
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/metrics")).status_code == 200
    run(go())
    assert env.metric("vllm_otel_receiver_webhooks_total", code="401") == 2
    assert env.metric("vllm_otel_receiver_webhooks_total", code="403") == 1


def test_bad_payloads_are_400_with_a_message(env: Env) -> None:
    async def go() -> None:
        async with env.client() as c:
            r = await c.post("/webhook", content=b"{not json", headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
            bad = am_payload(am_alert())
            del bad["alerts"][0]["fingerprint"]
            r = await c.post("/webhook", json=bad)
            assert r.status_code == 400
            assert "alerts.0.fingerprint" in r.json()["detail"] and "version 4" in r.json()["detail"]
            r = await c.post("/webhook", json={**am_payload(am_alert()), "version": "3"})
            assert r.status_code == 400 and "version" in r.json()["detail"]
            r = await c.post("/webhook", json=[1, 2])
            assert r.status_code == 400
            bad = am_payload(am_alert())
            bad["alerts"][0]["startsAt"] = "yesterday"
            r = await c.post("/webhook", json=bad)
            assert r.status_code == 400 and "startsAt" in r.json()["detail"]
    run(go())
    assert env.store.table_counts()["alerts"] == 0


def test_oversize_body_is_413_declared_or_streamed(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.receiver.max_body_bytes = 2000
    big = am_payload(*[am_alert(instance=f"h{i}:1") for i in range(20)])

    async def chunks():  # noqa: ANN202 - no Content-Length: the stream itself must be capped
        data = json.dumps(big).encode()
        for i in range(0, len(data), 500):
            yield data[i:i + 500]

    async def go() -> None:
        async with env.client() as c:
            assert (await c.post("/webhook", json=big)).status_code == 413
            r = await c.post("/webhook", content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413
    run(go())
    assert env.store.table_counts()["alerts"] == 0


def test_unknown_fields_ignored_truncated_alerts_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    payload = am_payload(am_alert(), truncated=3, someFutureField={"x": 1})
    payload["alerts"][0]["silencedBy"] = []
    with caplog.at_level(logging.WARNING, logger="vllm_otel.mitigate.receiver"):
        r = run(env.post(payload))
    assert r.status_code == 202, r.text
    assert any("truncatedAlerts" in rec.getMessage() and "3" in rec.getMessage() for rec in caplog.records)
    assert env.metric("vllm_otel_receiver_truncated_alerts_total") == 3


def test_store_outage_is_503_so_alertmanager_retries(tmp_path: Path) -> None:
    import shutil

    db_dir = tmp_path / "db"
    db_dir.mkdir()
    env = Env(tmp_path, db_url=f"sqlite:///{db_dir / 'r.db'}")
    env.store.engine.dispose()
    shutil.rmtree(db_dir)  # the database is gone (disk unmounted, server down)

    async def go() -> None:
        async with env.client() as c:
            r = await c.post("/webhook", json=am_payload(am_alert()))
            assert r.status_code == 503 and "store unavailable" in r.json()["detail"]
            h = await c.get("/healthz")
            assert h.status_code == 503 and h.json()["store"].startswith("error")
            assert "vllm_otel_receiver_store_up 0.0" in (await c.get("/metrics")).text
    run(go())
    assert env.metric("vllm_otel_receiver_store_errors_total") == 1


def test_actions_filters_and_lookup(env: Env) -> None:
    async def go() -> None:
        await env.post(am_payload(am_alert(instance=I1), am_alert("Unmapped", instance=I2)))
        await env.receiver.drain()
        assert {a["outcome"] for a in await env.actions()} == {"success", "unmapped"}
        [a] = await env.actions(alertname="Unmapped")
        assert a["outcome"] == "unmapped"
        assert [x["strategy"] for x in await env.actions(outcome="success")] == ["poke"]
        assert len(await env.actions(limit=1)) == 1
        async with env.client() as c:
            assert (await c.get(f"/actions/{a['id']}")).json()["alert"]["alertname"] == "Unmapped"
            assert (await c.get("/actions/4242")).status_code == 404
    run(go())


# --- durability, dedupe, each alert on its own ---------------------------------------------------------

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


def test_webhook_fast_route_leaves_other_methods_and_paths_to_the_router(env: Env) -> None:
    """POST /webhook skips the router (a hot path); everything else still goes through it, with
    clear answers for what it does not serve."""
    async def go() -> dict[str, httpx.Response]:
        async with env.client() as c:
            return {
                "posted": await c.post("/webhook", json=am_payload(am_alert())),
                "got": await c.get("/webhook"),
                "slash": await c.post("/webhook/", json=am_payload(am_alert())),
                "health": await c.get("/healthz"),
                "bad_limit": await c.get("/actions", params={"limit": "many"}),
                "bad_id": await c.get("/actions/first"),
                "no_such_id": await c.get("/actions/999"),
                "kill_get": await c.get("/killswitch"),
                "kill_put": await c.put("/killswitch", json={"engaged": True, "by": "x"}),
            }
    r = run(go())
    assert (r["posted"].status_code, r["got"].status_code, r["health"].status_code) == (202, 405, 200)
    assert r["slash"].status_code in (307, 404)  # the router's answer for a path that is not the webhook
    assert r["bad_limit"].status_code == 400 and "integer" in r["bad_limit"].json()["detail"]
    assert r["bad_id"].status_code == 404 and r["no_such_id"].status_code == 404
    assert r["kill_get"].status_code == 200 and r["kill_put"].status_code == 405
    assert env.metric("vllm_otel_receiver_webhooks_total", code="202") == 1


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


# --- modes -------------------------------------------------------------------------------------------

def test_dry_run_records_but_never_calls_the_actuator(tmp_path: Path) -> None:
    env = Env(tmp_path, strategies={"poke": {"mode": "dry-run", "params": {"level": 3}}})
    run(env.post(am_payload(am_alert())))
    run(env.receiver.drain())
    assert env.actuator.calls == []
    [act] = run(env.actions())
    assert act["outcome"] == "dry_run" and act["mode"] == "dry-run" and act["params"] == {"level": 3}
    assert "would run poke" in act["detail"]


def test_mode_off_removes_a_candidate(tmp_path: Path) -> None:
    env = Env(tmp_path, strategies={"poke": {"mode": "off"}})
    run(env.post(am_payload(am_alert())))
    run(env.receiver.drain())
    assert env.actuator.calls == [(I1, "restart", {})]


def test_approval_waits_for_approve_then_runs(tmp_path: Path) -> None:
    env = Env(tmp_path, strategies={"poke": {"mode": "approval"}})

    async def go() -> None:
        await env.post(am_payload(am_alert()))
        await env.receiver.drain()
        assert env.actuator.calls == []
        [act] = await env.actions()
        assert act["status"] == "awaiting_approval"
        async with env.client() as c:
            # "by" in the body is what the caller claims; the audit trail names the credential's owner.
            r = await c.post(f"/actions/{act['id']}/approve", json={"by": "mallory", "comment": "go"})
            assert r.status_code == 202, r.text
            assert (await c.post(f"/actions/{act['id']}/approve")).status_code == 409
            assert (await c.post("/actions/999/approve")).status_code == 404
        await env.receiver.drain()
        assert env.actuator.calls == [(I1, "poke", {"level": 1})]
        [act] = await env.actions()
        assert act["outcome"] == "success" and act["timings"]["approved_by"] == "alice"
        assert "mallory" not in json.dumps(act)
        assert any(g["guard"] == "kill_switch" for g in act["guards"])
    run(go())


def test_the_intake_token_cannot_approve_reject_read_or_release_the_kill_switch(tmp_path: Path) -> None:
    env = Env(tmp_path, strategies={"poke": {"mode": "approval"}})

    async def go() -> None:
        await env.post(am_payload(am_alert()))
        await env.receiver.drain()
        [act] = await env.actions()
        async with env.client() as ops:  # alice engages the kill switch, claiming to be someone else
            r = await ops.post("/killswitch", json={"engaged": True, "reason": "drill", "by": "mallory"})
            assert r.status_code == 200 and r.json()["by"] == "alice"
        async with env.only(TOKEN) as intake, env.client(token=None) as anon:
            for c, code in ((intake, 403), (anon, 401)):
                answers = [await c.post(f"/actions/{act['id']}/approve", json={"comment": "x"}),
                           await c.post(f"/actions/{act['id']}/reject", json={}),
                           await c.post("/killswitch", json={"engaged": False}),
                           await c.get("/killswitch"), await c.get("/actions"),
                           await c.get(f"/actions/{act['id']}"), await c.get("/learner")]
                assert [a.status_code for a in answers] == [code] * len(answers)
            r = await intake.post(f"/actions/{act['id']}/approve")
            assert "only delivers webhooks" in r.json()["detail"]
        # An operator's credential does not deliver webhooks either.
        async with env.client(token=OPERATORS["bob"]) as bob:
            assert (await bob.post("/webhook", json=am_payload(am_alert(instance=I2)))).status_code == 403
        await env.receiver.drain()
        [act] = await env.actions()
        assert act["status"] == "awaiting_approval" and env.actuator.calls == []
        assert env.store.kill_switch().engaged and env.store.kill_switch().by == "alice"
    run(go())


def test_without_operators_nobody_approves(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    app = create_app(Policy.from_mapping(policy_dict(strategies={"poke": {"mode": "approval"}}), REG),
                     store, actuator=RecordingActuator(), metrics_source=StaticMetrics({"kv": 0.5}),
                     token=TOKEN, start_worker=False)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            assert (await c.post("/webhook", json=am_payload(am_alert()))).status_code == 202
            r = await c.post("/killswitch", json={"engaged": False})
            assert r.status_code == 403 and "--operator" in r.json()["detail"]
    run(go())
    with pytest.raises(ValueError, match="different secrets"):
        create_app(Policy.from_mapping(policy_dict(), REG), store, token=TOKEN, operators={"x": TOKEN})


def test_unauthenticated_loopback_mode_records_nobody_and_wants_json(tmp_path: Path) -> None:
    """--allow-unauthenticated: no credentials at all. The trail says so instead of trusting `by`,
    and a cross-site form (text/plain, no preflight) cannot flip the kill switch."""
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    app = create_app(Policy.from_mapping(policy_dict(), REG), store, actuator=RecordingActuator(),
                     metrics_source=StaticMetrics({"kv": 0.5}), start_worker=False)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
            r = await c.post("/killswitch", content=b'{"engaged": true}',
                             headers={"content-type": "text/plain"})
            assert r.status_code == 415 and not store.kill_switch().engaged
            r = await c.post("/killswitch", json={"engaged": True, "by": "alice"})
            assert r.status_code == 200 and r.json()["by"] == "unauthenticated"
    run(go())


def test_reject_and_resolve_while_awaiting_approval(tmp_path: Path) -> None:
    env = Env(tmp_path, strategies={"poke": {"mode": "approval"}})
    a, b = am_alert(instance=I1), am_alert(instance=I2)

    async def go() -> None:
        await env.post(am_payload(a, b))
        await env.receiver.drain()
        acts = {x["alert"]["instance"]: x for x in await env.actions()}
        async with env.client(operator="bob") as c:
            r = await c.post(f"/actions/{acts[I1]['id']}/reject", json={"comment": "not now"})
            assert r.status_code == 200 and r.json()["outcome"] == "rejected"
        await env.post(am_payload(resolved(b)))
        acts = {x["alert"]["instance"]: x for x in await env.actions()}
        assert acts[I1]["outcome"] == "rejected" and acts[I2]["outcome"] == "cancelled"
        async with env.client() as c:
            assert (await c.post(f"/actions/{acts[I2]['id']}/approve")).status_code == 409
        await env.receiver.drain()
        assert env.actuator.calls == []
    run(go())


# --- guards ------------------------------------------------------------------------------------------

def _second_firing(instance: str = I1, dt: float = 1.0) -> dict[str, Any]:
    return am_alert(instance=instance, starts=datetime.now(timezone.utc) + timedelta(seconds=dt))


def test_cooldown_per_strategy_and_target(tmp_path: Path) -> None:
    env = Env(tmp_path, metrics=StaticMetrics({"kv": 0.2}))  # restart's precondition fails
    run(env.post(am_payload(am_alert(instance=I1))))
    run(env.receiver.drain())
    run(env.post(am_payload(_second_firing(I1), am_alert(instance=I2))))
    run(env.receiver.drain())
    # poke on I1 is cooling down (and restart does not apply); poke on I2 is a different target.
    assert [c[0] for c in env.actuator.calls] == [I1, I2]
    second = [a for a in run(env.actions()) if a["alert"]["instance"] == I1][0]
    assert second["outcome"] == "blocked"
    cd = [g for g in second["guards"] if g["guard"] == "cooldown"]
    assert cd and cd[0]["ok"] is False and "left" in cd[0]["detail"]


def test_cooldown_falls_through_to_next_candidate(tmp_path: Path) -> None:
    env = Env(tmp_path, metrics=StaticMetrics({"kv": 0.6}))
    run(env.post(am_payload(am_alert(instance=I1))))
    run(env.receiver.drain())
    run(env.post(am_payload(_second_firing(I1))))
    run(env.receiver.drain())
    assert [c[1] for c in env.actuator.calls] == ["poke", "restart"]


def test_global_rate_limit(tmp_path: Path) -> None:
    # Blast radius would stop 3 of 3; this test is about the rate limit.
    env = Env(tmp_path, guards={"rate_limit": {"max_actions": 2, "window_s": 600},
                                "blast_radius": {"max_affected_fraction": 1.0}})
    run(env.post(am_payload(am_alert(instance=I1), am_alert(instance=I2), am_alert(instance=I3))))
    run(env.receiver.drain())
    assert len(env.actuator.calls) == 2
    blocked = [a for a in run(env.actions()) if a["outcome"] == "blocked"]
    assert len(blocked) == 1 and "rate_limit" in blocked[0]["detail"]


def test_one_action_per_target_at_a_time(env: Env) -> None:
    # Another runner (a peer replica) holds I1 right now.
    assert env.store.acquire_lock("target:" + I1, "peer#job9", 600)
    run(env.post(am_payload(am_alert(instance=I1))))
    run(env.receiver.drain())
    assert env.actuator.calls == []
    [act] = run(env.actions())
    assert act["outcome"] == "blocked" and "another action is running" in act["detail"]
    # Our own actions release their target when done.
    env.store.release_lock("target:" + I1, "peer#job9")
    run(env.post(am_payload(_second_firing(I1))))
    run(env.receiver.drain())
    assert env.actuator.calls and env.store.lock_holder("target:" + I1) is None


def test_blast_radius_stops_and_escalates(tmp_path: Path) -> None:
    with WebhookSink() as sink:
        env = Env(tmp_path, sink_url=sink.url)
        run(env.post(am_payload(*[am_alert(instance=i) for i in (I1, I2, I3)])))
        run(env.receiver.drain())
        assert env.actuator.calls == []
        acts = run(env.actions())
        blocked = [a for a in acts if a["outcome"] == "blocked"]
        assert len(blocked) == 3 and all("3/3 targets" in a["why"] for a in blocked)
        esc = [a for a in acts if a["strategy"] == "escalate_to_human"]
        assert esc and all(a["outcome"] == "success" for a in esc)
        got = sink.wait_for(lambda p: "escalation (blast_radius)" in p.get("reason", ""), 5)
        assert got["alert"]["alertname"] == "VllmKvCacheNearlyFull"
    assert env.metric("vllm_otel_mitigation_escalations_total", reason="blast_radius") == 3


def test_stale_alert_and_stale_metrics_stop(tmp_path: Path) -> None:
    env = Env(tmp_path, metrics=StaticMetrics({"kv": 0.5}, age_s=600),
              escalation={"strategy": None})
    old = am_alert(instance=I1, starts=datetime.now(timezone.utc) - timedelta(hours=2))
    run(env.post(am_payload(old, am_alert(instance=I2))))
    run(env.receiver.drain())
    assert env.actuator.calls == []
    why = {a["alert"]["instance"]: a["why"] for a in run(env.actions())}
    assert why[I1].startswith("stale data: alert started") and "metrics are 600 s old" in why[I2]
    assert env.metric("vllm_otel_mitigation_escalations_total", reason="stale_data") == 2


def test_circuit_breaker_opens_exports_metric_and_escalates(tmp_path: Path) -> None:
    with WebhookSink() as sink:
        env = Env(tmp_path, sink_url=sink.url, metrics=StaticMetrics({"kv": 0.2}),
                  guards={"cooldown_s": 0, "circuit_breaker": {"failures": 3, "window_s": 600,
                                                               "open_s": 300}},
                  learner=RuleBasedLearner(failure_memory_s=0))
        env.actuator.fail = True
        for i in range(3):
            run(env.post(am_payload(_second_firing(I1, dt=i))))
            run(env.receiver.drain())
        assert len(env.actuator.calls) == 3
        assert env.metric("vllm_otel_mitigation_circuit_open", strategy="poke") == 1.0
        assert env.metric("vllm_otel_mitigation_circuit_open", strategy="restart") == 0.0
        got = sink.wait_for(lambda p: "circuit breaker of poke opened" in p.get("reason", ""), 5)
        assert got["alert"]["instance"] == I1
        # While open, poke is not tried again (restart does not apply at kv 0.2).
        run(env.post(am_payload(_second_firing(I1, dt=10))))
        run(env.receiver.drain())
        assert len(env.actuator.calls) == 3
        last = run(env.actions())[0]
        assert any(g["guard"] == "circuit_breaker" and not g["ok"] for g in last["guards"])
    assert env.mitigations("poke", "failure") == 3
    assert env.metric("vllm_otel_mitigation_escalations_total", reason="circuit_open") == 1


def test_kill_switch_in_config_and_via_api(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    cfg_env = Env(tmp_path / "a", kill_switch=True)
    run(cfg_env.post(am_payload(am_alert())))
    run(cfg_env.receiver.drain())
    assert cfg_env.actuator.calls == []
    assert run(cfg_env.actions())[0]["why"].startswith("kill switch: engaged in the policy")

    (tmp_path / "b").mkdir()
    env = Env(tmp_path / "b")

    async def go() -> None:
        async with env.client() as c:
            r = await c.post("/killswitch", json={"engaged": True, "reason": "maintenance", "by": "ops"})
            assert r.status_code == 200 and r.json()["engaged"] is True
            assert env.metric("vllm_otel_mitigation_kill_switch") == 1.0
            await env.post(am_payload(am_alert(instance=I1)))
            await env.receiver.drain()
            assert env.actuator.calls == []
            [act] = await env.actions()
            assert act["outcome"] == "blocked" and "maintenance" in act["why"]
            await c.post("/killswitch", json={"engaged": False, "by": "ops"})
            assert (await c.get("/killswitch")).json()["engaged"] is False
            await env.post(am_payload(am_alert(instance=I2)))
            await env.receiver.drain()
            assert [x[0] for x in env.actuator.calls] == [I2]
            assert (await c.post("/killswitch", json={"engaged": "maybe"})).status_code == 400
    run(go())


def test_precondition_and_least_invasive_first(tmp_path: Path) -> None:
    env = Env(tmp_path, metrics=StaticMetrics({"kv": 0.95}), guards={"cooldown_s": 0})
    run(env.post(am_payload(am_alert(instance=I1))))
    run(env.receiver.drain())
    # Both apply at kv 0.95; poke (10) goes before restart (80). Verification sees kv still high.
    assert env.actuator.calls == [(I1, "poke", {"level": 1})]
    [act] = run(env.actions())
    assert act["outcome"] == "no_effect" and act["verification"]["ok"] is False
    # The learner now skips poke on I1 (failed recently) and restart is next.
    run(env.post(am_payload(_second_firing(I1))))
    run(env.receiver.drain())
    assert [c[1] for c in env.actuator.calls] == ["poke", "restart"]


def test_a_failed_precondition_is_rechecked_while_the_alert_fires(tmp_path: Path) -> None:
    """One snapshot without pressure does not drop a firing alert: the job is looked at again
    (not an attempt, no action row meanwhile) until a precondition holds, the rechecks run out
    (skipped, saying so) or the alert resolves (cancelled)."""
    metrics = StaticMetrics({"kv": 0.1})  # restart needs kv >= 0.5
    env = Env(tmp_path, metrics=metrics, guards={"cooldown_s": 0},
              rules=[{"alertname": "VllmKvCacheNearlyFull", "strategies": ["restart"]}],
              worker={"precondition_rechecks": 2, "precondition_recheck_s": 0.2})

    def settle(until: Callable[[], bool] = lambda: True) -> None:
        # Rechecks are due 0.2 s apart; on a busy host a drain can come before one is due, so
        # look a few times (and up to 5 s while the expected state has not come).
        deadline, n = time.monotonic() + 5, 0
        while n < 3 or (not until() and time.monotonic() < deadline):
            time.sleep(0.25)
            run(env.receiver.drain())
            n += 1

    # 1. pressure comes back before the rechecks run out: the action runs
    first = am_alert(instance=I1)
    run(env.post(am_payload(first)))
    run(env.receiver.drain())
    assert run(env.actions()) == [] and env.actuator.calls == []
    job = env.store.job_for_alert(1)
    # Looked at, not attempted. (A drain slower than the recheck interval, as on a loaded CI host,
    # may look twice: both are rechecks, and the job still waits.)
    assert job is not None and job.state.value == "pending" and job.rechecks >= 1 and job.attempts == 0
    metrics.values = {"kv": 0.9}
    settle(lambda: bool(env.actuator.calls))
    assert env.actuator.calls == [(I1, "restart", {})]
    # 2. it never comes back: skipped after the rechecks, and the audit trail says so
    metrics.values = {"kv": 0.1}
    run(env.post(am_payload(am_alert(instance=I2))))
    settle(lambda: bool(run(env.actions(fingerprint=am_alert(instance=I2)["fingerprint"]))))
    [act] = run(env.actions(fingerprint=am_alert(instance=I2)["fingerprint"]))
    assert act["outcome"] == "skipped" and "(after 2 re-checks)" in act["detail"]
    # 3. the alert resolves while it waits: cancelled, nothing runs
    again = _second_firing(I1, dt=5.0)
    run(env.post(am_payload(again)))
    run(env.receiver.drain())
    run(env.post(am_payload(resolved(again))))
    settle()
    assert env.actuator.calls == [(I1, "restart", {})]
    assert env.store.job_for_alert(3).state.value == "cancelled"  # alerts: 1 and 3 on I1, 2 on I2


# --- restart, interruption ---------------------------------------------------------------------------

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


def test_paced_worker_misses_no_work_in_a_storm_of_wakes(tmp_path: Path) -> None:
    """While webhooks pour in, the worker is paced and ignores the wake-ups the intake sends after
    every commit (each would cost the intake GIL time); none of the alerts is left behind, and
    an alert arriving after the storm is taken at once."""
    # No polling to fall back on: only wake-ups and the pacing timer drive the worker here.
    env = Env(tmp_path, start_worker=True, worker={"poll_s": 60},
              guards={"cooldown_s": 0, "blast_radius": {"max_affected_fraction": 1.0}})
    storm = {"on": True}
    env.receiver.worker.foreground_busy = lambda: storm["on"]
    with role_client(env.app) as c:
        for inst in (I1, I2, I3):
            assert c.post("/webhook", json=am_payload(am_alert(instance=inst))).status_code == 202
        for _ in range(300):  # the intake's wake-ups during a storm
            env.receiver.wake()

        def outcomes() -> list[str | None]:
            return [a["outcome"] for a in c.get("/actions").json()["actions"]]

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(outcomes()) < 3 or None in outcomes()):
            time.sleep(0.05)
        assert outcomes() == ["success"] * 3
        storm["on"] = False
        t0 = time.monotonic()
        late = am_alert("VllmKvCacheNearlyFull", instance=I1, starts=datetime.now(timezone.utc) + timedelta(seconds=1))
        assert c.post("/webhook", json=am_payload(late)).status_code == 202
        while time.monotonic() - t0 < 10 and len(outcomes()) < 4:
            time.sleep(0.02)
        assert len(outcomes()) == 4 and time.monotonic() - t0 < 2.5, outcomes()


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


# --- escalation hook -----------------------------------------------------------------------------------

def test_escalate_to_human_posts_to_the_hook_with_a_token_file(tmp_path: Path) -> None:
    secret = "hook-secret-value-1234567890"
    token_file = tmp_path / "hook-token"
    token_file.write_text(secret + "\n")
    with WebhookSink() as sink:
        env = Env(tmp_path, sink_url=sink.url,
                  strategies={"escalate_to_human": {"params": {"token_file": str(token_file)}}})
        alert = am_alert("NeedsHuman", api_key="sk-abcdefghijklmnopqrstuvwxyz123456")
        run(env.post(am_payload(alert)))
        run(env.receiver.drain())
        got = sink.wait_for(lambda p: p.get("source") == "vllm-otel", 5)
        hdrs = {k.lower(): v for k, v in sink.received[-1]["headers"].items()}
        assert hdrs["authorization"] == f"Bearer {secret}"
        assert "NeedsHuman" in got["text"] and got["alert"]["labels"]["api_key"] != alert["labels"]["api_key"]
    [act] = run(env.actions())
    assert act["strategy"] == "escalate_to_human" and act["outcome"] == "success"
    everything = " ".join(env.store.iter_all_text())
    assert secret not in everything and "sk-abcdefghijklmnop" not in everything and TOKEN not in everything


# --- several replicas on a real PostgreSQL ---------------------------------------------------------------

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
    run(r1.post(am_payload(_second_firing(I3))))
    run(r1.receiver.drain())
    assert len(r1.actuator.calls + r2.actuator.calls) == 2
    assert run(r1.actions())[0]["outcome"] == "blocked"


# --- a real server, a real Alertmanager -------------------------------------------------------------------

# Exactly what Alertmanager 0.25 posts (captured from prometheus-alertmanager 0.25.0, field order kept).
AM_025_BODY = """{"receiver":"vllm-otel","status":"firing","alerts":[{"status":"firing","labels":\
{"alertname":"VllmKvCacheNearlyFull","instance":"10.0.0.1:8000","severity":"warning"},"annotations":\
{"summary":"vLLM KV cache is nearly full."},"startsAt":"%s","endsAt":"0001-01-01T00:00:00Z",\
"generatorURL":"http://prometheus:9090/graph?g0.expr=vllm%%3Akv_cache_usage_perc+%%3E+0.9&g0.tab=1",\
"fingerprint":"df46d0ab3a0ca2d7"}],"groupLabels":{"alertname":"VllmKvCacheNearlyFull","instance":\
"10.0.0.1:8000"},"commonLabels":{"alertname":"VllmKvCacheNearlyFull","instance":"10.0.0.1:8000",\
"severity":"warning"},"commonAnnotations":{"summary":"vLLM KV cache is nearly full."},"externalURL":\
"http://vm:9093","version":"4","groupKey":"{}:{alertname=\\"VllmKvCacheNearlyFull\\", instance=\\"10.0.0.1:8000\\"}",\
"truncatedAlerts":0}"""


def _wait_actions(url: str, pred: Any, timeout_s: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    acts: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        acts = httpx.get(f"{url}/actions", headers=OP_AUTH).json()["actions"]
        if pred(acts):
            return acts
        time.sleep(0.1)
    raise AssertionError(f"no matching actions in {timeout_s} s: {acts}")


def test_real_uvicorn_receives_alertmanager_025_body(tmp_path: Path) -> None:
    env = Env(tmp_path, start_worker=True)
    starts = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    body = (AM_025_BODY % starts).encode()
    json.loads(body)  # the fixture itself is valid JSON
    with UvicornThread(env.app) as srv:
        r = httpx.post(f"{srv.url}/webhook", content=body,
                       headers={"Content-Type": "application/json", "User-Agent": "Alertmanager/0.25.0",
                                "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 202 and r.json()["new"] == 1
        acts = _wait_actions(srv.url, lambda a: a and a[0]["outcome"])
        assert acts[0]["outcome"] == "success" and acts[0]["alert"]["fingerprint"] == "df46d0ab3a0ca2d7"
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'vllm_otel_mitigations_total{outcome="success",strategy="poke"} 1.0' in metrics
        assert 'vllm_otel_receiver_store_up 1.0' in metrics
        assert httpx.get(f"{srv.url}/healthz").json() == {
            "status": "ok", "replica": env.store.replica_id, "store": "ok", "worker": "running"}


def _cli_files(tmp_path: Path) -> tuple[Path, Path]:
    """A token file and a dry-run policy for a `vllm-otel receiver` process."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    (tmp_path / "alice.cred").write_text(OPERATORS["alice"] + "\n")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({
        "targets": [{"instance": I1}], "default_mode": "dry-run",
        "rules": [{"alertname": "VllmKvCacheNearlyFull", "strategies": ["escalate_to_human"]}],
        "strategies": {"escalate_to_human": {"params": {"url": "http://127.0.0.1:9/hook"}}}}))
    return token_file, policy_file


_CLI = ("import argparse, sys; from vllm_otel.mitigate.cli import add_parser; "
        "p = argparse.ArgumentParser(); add_parser(p.add_subparsers()); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def test_receiver_command_serves_tls_with_a_token_file(tmp_path: Path) -> None:
    """The `receiver` subcommand as a real process: HTTPS, bearer token from a file, SQLite store."""
    import shutil
    import ssl
    import subprocess
    import sys

    from vllm_otel.testing.processes import ManagedProcess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not on PATH: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token_file, policy_file = _cli_files(tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    proc = ManagedProcess("receiver", [
        sys.executable, "-c", _CLI, "receiver", "--config", str(policy_file), "--port", str(port),
        "--token-file", str(token_file), "--operator", f"alice={tmp_path / 'alice.cred'}",
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--db-url", f"sqlite:///{tmp_path / 'cli.db'}"], tmp_path / "receiver.log")
    with proc, httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=5) as c:
        deadline = time.monotonic() + 20
        while True:
            try:
                if c.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.post(f"{url}/webhook", json=am_payload(am_alert()),
                      headers={"Authorization": "Bearer nope"}).status_code == 403
        assert c.post(f"{url}/webhook", json=am_payload(am_alert()), headers=auth).status_code == 202
        deadline = time.monotonic() + 10
        while True:
            acts = c.get(f"{url}/actions", headers=OP_AUTH).json()["actions"]
            if acts and acts[0]["outcome"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert acts[0]["outcome"] == "dry_run" and acts[0]["strategy"] == "escalate_to_human"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # plain HTTP is not served
    assert TOKEN not in (tmp_path / "cli.db").read_bytes().decode("latin-1")


def test_rolling_restart_with_reuse_port_refuses_nothing(tmp_path: Path) -> None:
    """--reuse-port: a second receiver on the same port and store starts while the first still
    serves; then the first stops. Webhooks sent all along (retried on a transport error, as
    Alertmanager does) are all answered 202 and stored, and the new receiver serves alone after.
    Without --reuse-port on the running receiver, the second one says so and exits."""
    import sys

    from vllm_otel.testing.processes import ManagedProcess

    token_file, policy_file = _cli_files(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def receiver(name: str, *extra: str) -> ManagedProcess:
        return ManagedProcess(name, [
            sys.executable, "-c", _CLI, "receiver", "--config", str(policy_file), "--port", str(port),
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


@pytest.mark.alertmanager
def test_real_alertmanager_delivers_with_bearer_token_file(tmp_path: Path) -> None:
    from vllm_otel.testing.services import AlertmanagerServer

    env = Env(tmp_path, start_worker=True)
    token_file = tmp_path / "am-token"
    token_file.write_text(TOKEN)
    with UvicornThread(env.app) as srv, AlertmanagerServer(
            tmp_path / "am", webhook_url=f"{srv.url}/webhook", bearer_token_file=token_file) as am:
        now = datetime.now(timezone.utc).isoformat()
        r = httpx.post(f"{am.url}/api/v2/alerts", json=[{
            "labels": {"alertname": "VllmKvCacheNearlyFull", "instance": I2, "severity": "warning"},
            "annotations": {"summary": "kv"}, "startsAt": now}])
        assert r.status_code == 200
        acts = _wait_actions(srv.url, lambda a: a and a[0]["outcome"], timeout_s=20)
        assert acts[0]["outcome"] == "success" and acts[0]["alert"]["instance"] == I2
    assert env.actuator.calls == [(I2, "poke", {"level": 1})]
    assert env.metric("vllm_otel_receiver_webhooks_total", code="202") >= 1


@pytest.mark.parametrize("share, pause_s", [(0.1, 0.9), (0.25, 0.3), (1.0, 0.0)])
def test_worker_busy_share_sets_the_pause_after_a_job(tmp_path: Path, share: float, pause_s: float) -> None:
    """worker.busy_share (policy): after a 0.1 s job during a storm, the next one waits so that
    jobs take at most that share of the time."""
    env = Env(tmp_path, worker={"busy_share": share})
    worker = env.receiver.worker

    async def job() -> None:
        return None

    async def go() -> float:
        task = asyncio.ensure_future(job())
        await task
        worker._started_at[task] = time.monotonic() - 0.1  # it ran for 0.1 s
        worker._task_done(task)
        return worker._next_paced_start - time.monotonic()

    assert run(go()) == pytest.approx(pause_s, abs=0.03)
