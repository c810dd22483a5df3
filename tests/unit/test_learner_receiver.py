"""The learner inside the receiver: persistence across a restart (through the store), the
confidence threshold, the /metrics series, rules, register_strategy and the CLI. Real receiver app
and SQLite store; the actuator is the recording boundary of receiver_support.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.receiver_support import (OPERATORS, REG, TOKEN, Env, Poke, RecordingActuator, StaticMetrics, am_alert,
                                 am_payload, policy_dict, run)
from tests.receiver_support import second_firing as _second_firing
from vllm_otel.cli import main as cli_main
from vllm_otel.learn import extract_rules, make_learner
from vllm_otel.learn.evidence import Evidence
from vllm_otel.mitigate.policy import Policy
from vllm_otel.mitigate.receiver import create_app
from vllm_otel.mitigate.strategies import REGISTRY, StrategyConfigError, register_strategy
from vllm_otel.mitigate.store import Store

# kv 0.45: poke applies and verifies (kv < 0.9), restart does not apply (needs kv >= 0.5).
POLICY = {"guards": {"cooldown_s": 0, "circuit_breaker": {"failures": 10},
                     "blast_radius": {"max_affected_fraction": 1.0}},
          "learner": {"retry_after_s": 0}}


class LEnv(Env):
    """test_receiver's Env, with the policy's learner: section (Env's own ``learner`` argument is
    a learner object, so the section cannot go through it)."""

    def __init__(self, tmp_path: Path, *, db_url: str, learner_cfg: dict, **over: object) -> None:
        self.store = Store(db_url)
        self.policy = Policy.from_mapping(policy_dict(**{**POLICY, **over, "learner": learner_cfg}), REG)
        self.actuator = RecordingActuator()
        self.app = create_app(self.policy, self.store, actuator=self.actuator,
                              metrics_source=StaticMetrics({"kv": 0.45}), token=TOKEN,
                              operators=OPERATORS, start_worker=False)
        self.receiver = self.app.state.receiver


def learner_body(env: Env) -> dict:
    async def go() -> httpx.Response:
        async with env.client() as c:
            return await c.get("/learner")
    r = run(go())
    assert r.status_code == 200
    return r.json()


def test_what_the_learner_learnt_survives_a_receiver_restart(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'rx.db'}"
    env = LEnv(tmp_path, db_url=db, learner_cfg={"retry_after_s": 0})
    env.actuator.fail = True
    for i in range(3):
        run(env.post(am_payload(_second_firing(dt=i))))
        run(env.receiver.drain())
    assert [c[1] for c in env.actuator.calls] == ["poke"] * 3
    before = learner_body(env)
    assert before["kind"] == "ucb"
    [row] = [r for r in before["stats"] if r["strategy"] == "poke"]
    assert (row["attempts"], row["successes"], row["dropped"]) == (3, 0, True)
    # The /metrics series the mitigation dashboard reads.
    labels = {"failure_type": "VllmKvCacheNearlyFull", "strategy": "poke"}
    assert env.metric("vllm_otel_learner_selections_total", **labels) == 3
    assert env.metric("vllm_otel_learner_outcomes_total", outcome="failure", **labels) == 3
    assert env.metric("vllm_otel_learner_success_probability", **labels) == pytest.approx(
        1 / (2 + 1 + 0.95 + 0.95 ** 2), abs=1e-3)  # Beta(1, 1 + three discounted failures)
    env.store.close()

    # A new receiver on the same store: same knowledge, so poke (failed three times in a row in
    # this situation) is not tried again and the alert goes to a human.
    env2 = LEnv(tmp_path, db_url=db, learner_cfg={"retry_after_s": 0})
    assert learner_body(env2)["stats"] == before["stats"]
    run(env2.post(am_payload(_second_firing(dt=10))))
    run(env2.receiver.drain())
    assert env2.actuator.calls == []
    [last] = [a for a in run(env2.actions()) if a["strategy"] is None]
    assert last["outcome"] == "skipped" and "poke failed 3 times in a row here" in last["why"]
    assert env2.metric("vllm_otel_mitigation_escalations_total", reason="exhausted") == 1
    # make_learner(store=...) rebuilds the same state outside the receiver (CLI, benchmarks).
    rebuilt = make_learner({"retry_after_s": 0}, store=env2.store)
    assert {r["strategy"]: r["attempts"] for r in rebuilt.stats()}["poke"] == 3


def test_low_confidence_auto_action_waits_for_approval(tmp_path: Path) -> None:
    env = LEnv(tmp_path, db_url=f"sqlite:///{tmp_path / 'a.db'}",
               learner_cfg={"confidence_threshold": 0.6})
    run(env.post(am_payload(am_alert())))
    run(env.receiver.drain())
    assert env.actuator.calls == []
    [act] = run(env.actions())
    assert act["status"] == "awaiting_approval" and act["confidence"] == 0.5
    assert "confidence below learner.confidence_threshold (0.60)" in act["why"]
    # Above the threshold it runs as configured (auto).
    env2 = LEnv(tmp_path, db_url=f"sqlite:///{tmp_path / 'b.db'}",
                learner_cfg={"confidence_threshold": 0.4})
    run(env2.post(am_payload(am_alert())))
    run(env2.receiver.drain())
    assert env2.actuator.calls == [("10.0.0.1:8000", "poke", {"level": 1})]


def test_rules_are_mined_with_support_and_confidence() -> None:
    ev = Evidence(discount=0.95)
    hi = ("queue_overload", "warning", "kv_cache_usage >= 0.9")
    lo = ("queue_overload", "warning", "kv_cache_usage < 0.9")
    for i in range(45):
        ev.record(hi, "lower_queue_limits", i % 11 != 0 or i >= 44, at=i, duration_s=1, target="t",
                  outcome="x")
    for i in range(20):
        ev.record(lo, "lower_queue_limits", i % 4 == 0, at=i, duration_s=1, target="t", outcome="x")
    ev.record(lo, "restart_engine", True, at=1, duration_s=1, target="t", outcome="x")
    texts = [r.text for r in extract_rules(ev, min_support=5, min_lift=0.15)]
    assert "for queue_overload at kv_cache_usage >= 0.9, lower_queue_limits succeeded 41 of 45 times (91%)" in texts
    assert "for queue_overload at kv_cache_usage < 0.9, lower_queue_limits succeeded 5 of 20 times (25%)" in texts
    assert "for queue_overload, lower_queue_limits succeeded 46 of 65 times (71%)" in texts
    # Below the support, and narrower rules that say nothing new, are left out.
    assert not any("restart_engine" in t for t in texts)
    assert not any("at warning," in t or t.endswith("at warning") for t in texts)


@pytest.fixture
def clean_registry():  # noqa: ANN201
    """register_strategy adds to the process-wide registry; other tests list it."""
    saved = dict(REGISTRY._classes)
    yield
    REGISTRY._classes.clear()
    REGISTRY._classes.update(saved)


def test_register_strategy_by_name_with_an_instance_or_a_class(clean_registry: None) -> None:
    cls = register_strategy("learner_test_poke_hard", Poke({"level": 3}))
    assert REGISTRY.create("learner_test_poke_hard").params.level == 3
    assert REGISTRY.create("learner_test_poke_hard", {"level": 5}).params.level == 5
    assert cls.name == "learner_test_poke_hard" and cls.invasiveness == Poke.invasiveness
    register_strategy("learner_test_poke", Poke)
    assert REGISTRY.create("learner_test_poke").params.level == 1
    with pytest.raises(StrategyConfigError, match="not a Strategy"):
        register_strategy("learner_test_bad", object())  # type: ignore[arg-type]
    with pytest.raises(StrategyConfigError, match="snake_case"):
        register_strategy("Bad Name", Poke)
    import vllm_otel

    assert vllm_otel.register_strategy is register_strategy


def test_cli_learner_show_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'rx.db'}"
    store = Store(db)
    for i, ok in enumerate([True, True, False, True, True, True]):
        aid = store.create_action(alert_id=None, job_id=None, strategy="reset_prefix_cache",
                                  target="10.0.0.1:8000", mode="auto", why="test",
                                  state={"failure_type": "kv_cache_exhaustion", "target": "10.0.0.1:8000",
                                         "severity": "warning"}, metrics_before={"kv_cache_usage": 0.95})
        store.add_action_event(aid, "started")
        store.finish_action(aid, "success" if ok else "no_effect", detail="t")
    store.close()
    assert cli_main(["learner", "show", "--db-url", db, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    [row] = body["stats"]
    assert (row["strategy"], row["attempts"], row["successes"]) == ("reset_prefix_cache", 6, 5)
    assert body["rules"][0]["text"] == ("for kv_cache_exhaustion, reset_prefix_cache succeeded 5 of 6 "
                                        "times (83%)")
    assert cli_main(["learner", "show", "--db-url", db]) == 0
    table = capsys.readouterr().out
    assert "reset_prefix_cache" in table and "succeeded 5 of 6 times" in table
    assert cli_main(["learner", "export", "--db-url", db]) == 0
    exported = tmp_path / "learner.json"
    exported.write_text(capsys.readouterr().out)
    assert cli_main(["learner", "show", "--from-json", str(exported), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"] == body["stats"]
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(SystemExit, match="not a vllm-otel learner export"):
        cli_main(["learner", "show", "--from-json", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="--db-url"):
        cli_main(["learner", "show"])
    assert TOKEN  # the receiver's token is unused here; imported helpers share one module
