"""What the receiver decides for an alert, end to end through the webhook: modes (dry-run,
off), the guards (cooldown, rate limit, one action per target, blast radius, stale data,
circuit breaker, kill switch, preconditions) and escalation to a human's hook."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest

from tests.receiver_support import (I1, I2, I3, TOKEN, Env, StaticMetrics, am_alert, am_payload, resolved,
                                    run, second_firing)
from vllm_otel.learn.learner import RuleBasedLearner
from vllm_otel.testing.webhook import WebhookSink


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


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


def test_cooldown_per_strategy_and_target(tmp_path: Path) -> None:
    env = Env(tmp_path, metrics=StaticMetrics({"kv": 0.2}))  # restart's precondition fails
    run(env.post(am_payload(am_alert(instance=I1))))
    run(env.receiver.drain())
    run(env.post(am_payload(second_firing(I1), am_alert(instance=I2))))
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
    run(env.post(am_payload(second_firing(I1))))
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
    run(env.post(am_payload(second_firing(I1))))
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
            run(env.post(am_payload(second_firing(I1, dt=i))))
            run(env.receiver.drain())
        assert len(env.actuator.calls) == 3
        assert env.metric("vllm_otel_mitigation_circuit_open", strategy="poke") == 1.0
        assert env.metric("vllm_otel_mitigation_circuit_open", strategy="restart") == 0.0
        got = sink.wait_for(lambda p: "circuit breaker of poke opened" in p.get("reason", ""), 5)
        assert got["alert"]["instance"] == I1
        # While open, poke is not tried again (restart does not apply at kv 0.2).
        run(env.post(am_payload(second_firing(I1, dt=10))))
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
    run(env.post(am_payload(second_firing(I1))))
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
    again = second_firing(I1, dt=5.0)
    run(env.post(am_payload(again)))
    run(env.receiver.drain())
    run(env.post(am_payload(resolved(again))))
    settle()
    assert env.actuator.calls == [(I1, "restart", {})]
    assert env.store.job_for_alert(3).state.value == "cancelled"  # alerts: 1 and 3 on I1, 2 on I2


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
