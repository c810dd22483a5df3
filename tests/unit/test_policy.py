"""Policy files, the strategy registry, and each guard on its own (real SQLite store, our clock)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_otel.mitigate.cli import add_parser
from vllm_otel.mitigate.records import AlertRecord, Mode
from vllm_otel.mitigate.policy import Guardrails, Policy, PolicyError, load_policy
from vllm_otel.mitigate.strategies import (REGISTRY, ActionResult, Strategy, StrategyConfigError,
                                           StrategyParams, StrategyRegistry, Verification)
from vllm_otel.mitigate.strategies.escalate import EscalateToHuman
from vllm_otel.mitigate.store import Store

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "policy.yaml"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class NudgeParams(StrategyParams):
    amount: int = 1


class Nudge(Strategy):
    """Nudge the engine (test strategy)."""

    name = "nudge"
    invasiveness = 20
    Params = NudgeParams

    async def execute(self, ctx, actuator):  # noqa: ANN001, ANN201
        return ActionResult(ok=True)

    async def verify(self, ctx):  # noqa: ANN001, ANN201
        return Verification(ok=True)


REG = REGISTRY.copy()
REG.register(Nudge)


def policy(**over: Any) -> Policy:
    data: dict[str, Any] = {
        "targets": [{"instance": f"i{n}"} for n in range(1, 5)],
        "rules": [{"alertname": "A", "strategies": ["nudge"]},
                  {"failure_type": "kv_cache_exhaustion", "strategies": ["nudge", "escalate_to_human"]},
                  {"labels": {"team": "x"}, "strategies": []}],
        "strategies": {"escalate_to_human": {"params": {"url": "http://127.0.0.1:9/x"}}},
    }
    data.update(over)
    return Policy.from_mapping(data, REG)


def record(name: str = "A", instance: str | None = "i1", starts_at: float = 0.0, **labels: str) -> AlertRecord:
    return AlertRecord(id=1, key="k", fingerprint="f", alertname=name, instance=instance,
                       failure_type=labels.get("failure_type"), severity=None, starts_at=starts_at,
                       labels={"alertname": name, **labels}, annotations={}, generator_url="",
                       group_key="", received_at=starts_at)


# --- files ---------------------------------------------------------------------------------------

def test_example_policy_loads_and_maps_every_shipped_alert() -> None:
    pol = load_policy(EXAMPLE)
    assert pol.config.default_mode is Mode.DRY_RUN
    assert isinstance(pol.strategy("escalate_to_human"), EscalateToHuman)
    names = [r["alert"] for f in (ROOT / "alerts").glob("*.rules.yml")
             for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert names
    unmapped = [n for n in names if pol.candidates(n, {"alertname": n}) is None]
    assert unmapped == [], f"alerts without a policy rule in examples/policy.yaml: {unmapped}"


def test_check_config_cli(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["receiver", "--config", str(EXAMPLE), "--check-config"])
    assert args.func(args) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "--token-file is required"),
    (["--allow-unauthenticated", "--host", "0.0.0.0"], "refusing to listen"),
    (["--token-file", "/nonexistent/token"], "cannot read --token-file"),
    (["--allow-unauthenticated", "--tls-cert", "c.pem"], "go together"),
    (["--allow-unauthenticated", "--operator", "alice"], "--operator wants NAME=FILE"),
    (["--allow-unauthenticated", "--operator", "alice=/nonexistent/alice"],
     "cannot read the credential of operator alice"),
    (["--allow-unauthenticated", "--operator", "al ice=/etc/hostname"], "bad operator name"),
])
def test_cli_refuses_unsafe_or_broken_setups(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["receiver", "--config", str(EXAMPLE), *argv])
    assert args.func(args) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_short_or_shared_operator_credentials(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    short, intake = tmp_path / "short", tmp_path / "intake"
    short.write_text("hunter2\n")
    intake.write_text("the-intake-token-0123456789\n")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for argv, message in ((["--allow-unauthenticated", "--operator", f"alice={short}"], "shorter than 16"),
                          (["--token-file", str(intake), "--operator", f"alice={intake}"], "different secrets")):
        args = parser.parse_args(["receiver", "--config", str(EXAMPLE), *argv])
        assert args.func(args) == 2
        assert message in capsys.readouterr().err


def test_policy_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    def bad(text: str, suffix: str = ".yaml") -> str:
        p = tmp_path / f"p{suffix}"
        p.write_text(text)
        with pytest.raises(PolicyError) as e:
            load_policy(p, REG)
        assert str(p) in str(e.value)
        return str(e.value)

    assert "unknown strategy 'restart_everything'" in bad(
        "rules: [{alertname: A, strategies: [restart_everything]}]")
    assert "timeout_s" in bad("strategies: {escalate_to_human: {params: {url: 'http://h/x', timeout_s: -1}}}")
    assert "colour" in bad("strategies: {nudge: {params: {colour: red}}}")  # typo in params
    assert "url" in bad("strategies: {escalate_to_human: {params: {}}}")
    assert "surprise" in bad("surprise: 1\n")
    assert "needs alertname, failure_type or labels" in bad("rules: [{strategies: [nudge]}]")
    assert "strategies.nudge.mode" in bad("strategies: {nudge: {mode: sometimes}}")
    assert "not valid YAML" in bad("rules: [\n")
    assert "not valid JSON" in bad("{", suffix=".json")
    assert "top level" in bad("- a\n- b\n")
    assert "listed twice" in bad("targets: [{instance: a}, {instance: a}]")
    assert "lease_s" in bad("worker: {action_timeout_s: 100, lease_s: 150}")
    assert "target_lease_s" in bad("guards: {target_lease_s: 30}")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml", REG)


def test_json_policy_and_defaults(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text('{"rules": [{"alertname": "A", "strategies": ["nudge"]}], '
                 '"strategies": {"escalate_to_human": {"params": {"url": "http://h/x"}}, '
                 '"nudge": {"mode": "auto", "cooldown_s": 5, "params": {"amount": 3}}}}')
    pol = load_policy(p, REG)
    assert pol.mode("nudge") is Mode.AUTO and pol.mode("escalate_to_human") is Mode.DRY_RUN
    assert pol.cooldown_s("nudge") == 5 and pol.cooldown_s("escalate_to_human") == 300
    assert pol.strategy("nudge").params.amount == 3  # type: ignore[attr-defined]


def test_rules_first_match_by_name_failure_type_or_labels() -> None:
    pol = policy()
    assert pol.candidates("A", {"failure_type": "kv_cache_exhaustion"}) == ["nudge"]  # first wins
    assert pol.candidates("Forecast", {"failure_type": "kv_cache_exhaustion"}) == ["nudge", "escalate_to_human"]
    assert pol.candidates("B", {"team": "x"}) == []  # record only
    assert pol.candidates("B", {"team": "y"}) is None  # unmapped
    assert pol.target("i2") is not None and pol.target("i9") is None and pol.target(None) is None


# --- registry ---------------------------------------------------------------------------------------

def test_registration_checks_the_class() -> None:
    reg = StrategyRegistry()

    class NoDoc(Strategy):
        name = "no_doc"
        invasiveness = 1

        async def execute(self, ctx, actuator):  # noqa: ANN001, ANN201
            return ActionResult(ok=True)

        async def verify(self, ctx):  # noqa: ANN001, ANN201
            return Verification(ok=True)

    with pytest.raises(StrategyConfigError, match="docstring"):
        reg.register(NoDoc)

    class LooseParams(StrategyParams):
        model_config = {"extra": "allow"}

    class Bad(NoDoc):
        """Bad in every way."""

        name = "Bad-Name"
        invasiveness = 500
        Params = LooseParams

        def execute(self, ctx, actuator):  # type: ignore[override]  # noqa: ANN001, ANN201
            return ActionResult(ok=True)

    with pytest.raises(StrategyConfigError) as e:
        reg.register(Bad)
    msg = str(e.value)
    for part in ("snake_case", "invasiveness", "forbid unknown fields", "execute must be async"):
        assert part in msg

    reg.register(Nudge)
    with pytest.raises(StrategyConfigError, match="already registered"):
        class Other(Nudge):
            """Another nudge."""
        reg.register(Other)
    with pytest.raises(StrategyConfigError, match="amount"):
        reg.create("nudge", {"amount": "lots"})
    assert reg.create("nudge", {"amount": 2}).params.amount == 2  # type: ignore[attr-defined]
    assert [d["name"] for d in REG.describe()][0] == "escalate_to_human"  # least invasive first


def test_builtin_registry_strategies_are_documented() -> None:
    for info in REGISTRY.describe():
        assert info["summary"] and 0 <= info["invasiveness"] <= 100


# --- guards -------------------------------------------------------------------------------------------

@pytest.fixture
def guards(tmp_path: Path) -> tuple[Guardrails, Store, Clock]:
    clock = Clock()
    store = Store(f"sqlite:///{tmp_path / 'g.db'}")
    pol = policy(guards={"cooldown_s": 60, "rate_limit": {"max_actions": 2, "window_s": 100},
                         "circuit_breaker": {"failures": 3, "window_s": 1000, "open_s": 200},
                         "blast_radius": {"max_affected_fraction": 0.5, "min_affected": 2,
                                          "max_alert_age_s": 600, "max_metrics_age_s": 30}})
    return Guardrails(pol, store, clock), store, clock


def _run(store: Store, clock: Clock, strategy: str, outcome: str, target: str = "i1") -> None:
    aid = store.create_action(alert_id=None, job_id=None, strategy=strategy, target=target,
                              mode="auto", why="t", now=clock())
    store.add_action_event(aid, "started", now=clock())
    store.finish_action(aid, outcome, now=clock())


def test_kill_switch_from_config_or_store(guards: tuple[Guardrails, Store, Clock], tmp_path: Path) -> None:
    g, store, clock = guards
    assert g.kill_switch().ok
    store.set_kill_switch(True, by="ops", reason="incident")
    d = g.kill_switch()
    assert not d.ok and "ops" in d.detail and "incident" in d.detail
    store.set_kill_switch(False)
    assert g.kill_switch().ok
    g2 = Guardrails(policy(kill_switch=True), store, clock)
    assert not g2.kill_switch().ok and "policy file" in g2.kill_switch().detail


def test_target_allow_list(guards: tuple[Guardrails, Store, Clock]) -> None:
    g, _, _ = guards
    assert g.target_allowed("i1").ok
    assert not g.target_allowed("i9").ok and not g.target_allowed(None).ok


def test_stale_alert_and_metrics(guards: tuple[Guardrails, Store, Clock]) -> None:
    g, _, clock = guards
    assert g.alert_fresh(record(starts_at=clock() - 100)).ok
    assert not g.alert_fresh(record(starts_at=clock() - 601)).ok
    assert g.metrics_fresh(clock() - 10, True).ok
    d = g.metrics_fresh(clock() - 31, True)
    assert not d.ok and "31 s old" in d.detail
    assert g.metrics_fresh(None, False).ok  # metrics not required by default
    g.policy.config.guards.blast_radius.require_metrics = True
    assert not g.metrics_fresh(None, True).ok


def test_blast_radius(guards: tuple[Guardrails, Store, Clock]) -> None:
    from vllm_otel.mitigate.records import AlertmanagerAlert

    g, store, clock = guards

    def fire(instance: str) -> None:
        store.add_firing_alert(AlertmanagerAlert.model_validate({
            "status": "firing", "labels": {"alertname": "A", "instance": instance},
            "fingerprint": instance, "startsAt": "2027-01-15T08:00:00Z"}), received_at=clock())

    fire("i1")
    assert g.blast_radius().ok  # 1 of 4
    fire("i2")
    assert g.blast_radius().ok  # 2 of 4 is not more than half
    fire("not-in-fleet")
    assert g.blast_radius().ok
    fire("i3")
    d = g.blast_radius()
    assert not d.ok and "3/4" in d.detail
    clock.t += 5 * 3600  # alerts not seen for longer than the active window no longer count
    assert g.blast_radius().ok
    one = Guardrails(policy(targets=[{"instance": "i1"}]), store, clock)
    fire("i1")
    assert one.blast_radius().ok  # a single-instance fleet is never stopped by its own alert


def test_cooldown_per_strategy_and_target(guards: tuple[Guardrails, Store, Clock]) -> None:
    g, store, clock = guards
    _run(store, clock, "nudge", "success", target="i1")
    clock.t += 30
    d = g.cooldown("nudge", "i1")
    assert not d.ok and "30 s left" in d.detail
    assert g.cooldown("nudge", "i2").ok and g.cooldown("escalate_to_human", "i1").ok
    clock.t += 31
    assert g.cooldown("nudge", "i1").ok


def test_rate_limit_counts_actions_not_notifications(guards: tuple[Guardrails, Store, Clock]) -> None:
    g, store, clock = guards
    _run(store, clock, "nudge", "success", "i1")
    _run(store, clock, "escalate_to_human", "success", "i1")  # invasiveness 0: not counted
    assert g.rate_limit().ok
    _run(store, clock, "nudge", "success", "i2")
    d = g.rate_limit()
    assert not d.ok and "2 actions" in d.detail
    clock.t += 101
    assert g.rate_limit().ok


def test_circuit_breaker_open_half_open_closed(guards: tuple[Guardrails, Store, Clock]) -> None:
    g, store, clock = guards
    for outcome in ("failure", "no_effect"):
        _run(store, clock, "nudge", outcome)
        clock.t += 1
    assert not g.circuit("nudge").open
    _run(store, clock, "nudge", "dry_run")  # not an execution: does not count either way
    _run(store, clock, "nudge", "interrupted")
    st = g.circuit("nudge")
    assert st.open and "3 failures" in st.detail and not g.circuit_guard("nudge").ok
    assert not g.circuit("escalate_to_human").open
    clock.t += 200
    assert not g.circuit("nudge").open and "half-open" in g.circuit("nudge").detail
    _run(store, clock, "nudge", "failure")  # the trial failed: open again
    assert g.circuit("nudge").open
    clock.t += 1
    _run(store, clock, "nudge", "success")
    assert not g.circuit("nudge").open
    # Failures spread wider than the window do not open it.
    for _ in range(3):
        clock.t += 600
        _run(store, clock, "nudge", "failure")
    assert not g.circuit("nudge").open


def test_one_action_per_target(guards: tuple[Guardrails, Store, Clock]) -> None:
    g, _, _ = guards
    assert g.acquire_target("i1", "r#job1").ok
    d = g.acquire_target("i1", "r#job2")
    assert not d.ok and "r#job1" in d.detail
    assert g.acquire_target("i2", "r#job2").ok
    g.release_target("i1", "r#job1")
    assert g.acquire_target("i1", "r#job2").ok


def test_mode_off_guard() -> None:
    pol = policy(strategies={"escalate_to_human": {"params": {"url": "http://h/x"}},
                             "nudge": {"mode": "off"}})
    g = Guardrails(pol, None, Clock())  # type: ignore[arg-type] - mode needs no store
    assert not g.mode_allows("nudge").ok and g.mode_allows("escalate_to_human").ok
