"""The receiver's HTTP contract: auth (401 without, 403 wrong), 400 for what will never be
valid, 413 for oversize bodies, 503 while the store is down (so Alertmanager retries), the
audit-trail reads, and the hot webhook route beside the router."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from tests.receiver_support import I1, I2, TOKEN, Env, am_alert, am_payload, run


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


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
