"""Approval mode and the operator roles over the API: an action waits for an operator's
approve or reject, the audit trail names the credential's owner (never the body's ``by``), and
the intake token can neither approve, reject, read nor touch the kill switch."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.receiver_support import (I1, I2, OPERATORS, REG, TOKEN, Env, RecordingActuator, StaticMetrics,
                                    am_alert, am_payload, policy_dict, resolved, run)
from vllm_otel.mitigate.policy import Policy
from vllm_otel.mitigate.receiver import create_app
from vllm_otel.mitigate.store import Store


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
