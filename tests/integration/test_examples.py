"""Every file in examples/ runs: the policy loads, the custom strategy acts through a real receiver,
and the monitoring example talks to the session's real vLLM and Prometheus."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TOKEN = "examples-receiver-token-5a1f"            # intake: Alertmanager's webhooks
OPERATOR = "examples-operator-credential-77c2"     # an operator reading the audit trail


def test_the_example_policy_loads_as_the_receiver_would() -> None:
    r = subprocess.run([sys.executable, "-m", "vllm_otel", "receiver", "--config", str(EXAMPLES / "policy.yaml"),
                        "--check-config"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_custom_strategy_example_registers_and_validates_its_policy() -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / "custom_strategy.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "shift_traffic: invasiveness 15, mode auto" in r.stdout


@pytest.fixture(scope="module")
def custom_strategy() -> Iterator[Any]:
    """Import the example as a user would: registering `shift_traffic` in the strategy registry
    (taken out again afterwards: other tests check what the built-in registry holds)."""
    from vllm_otel.mitigate.strategies import REGISTRY

    sys.path.insert(0, str(EXAMPLES))
    try:
        import custom_strategy as mod
    finally:
        sys.path.remove(str(EXAMPLES))
    try:
        yield mod
    finally:
        REGISTRY.unregister("shift_traffic")
        sys.modules.pop("custom_strategy", None)


def test_a_bad_parameter_of_the_custom_strategy_stops_the_policy_at_load(custom_strategy: Any) -> None:
    from vllm_otel.mitigate.policy import Policy, PolicyError

    with pytest.raises(PolicyError, match="shift_traffic.*weight"):
        Policy.from_mapping({"escalation": {"strategy": None},
                             "strategies": {"shift_traffic": {"params": {"hook": "lb", "weight": 3}}}})


@pytest.fixture
def receiver_with_custom_strategy(custom_strategy: Any, vllm_server: Any, tmp_path: Path) -> Iterator[dict]:
    from vllm_otel.learn.learner import RuleBasedLearner
    from vllm_otel.mitigate.actuators import build_actuator, build_metrics_source
    from vllm_otel.mitigate.policy import Policy
    from vllm_otel.mitigate.receiver import create_app
    from vllm_otel.mitigate.store import Store
    from vllm_otel.testing.services import UvicornThread
    from vllm_otel.testing.webhook import WebhookSink

    instance = f"127.0.0.1:{vllm_server.port}"
    with WebhookSink(path="/members") as lb:  # the user's load balancer API: a real HTTP endpoint
        policy = Policy.from_mapping({
            "targets": [{"instance": instance, "url": vllm_server.url}],
            "escalation": {"strategy": None},
            "rules": [{"failure_type": "queue_overload", "strategies": ["shift_traffic"]}],
            "strategies": {"shift_traffic": {"mode": "auto", "params": {
                "hook": "lb_weight", "weight": 0.25, "min_waiting": 0, "verify_window_s": 10}}},
            "actuator": {"hooks": {"lb_weight": {"method": "POST", "url": lb.url.rsplit("/", 1)[0] + "/members/${instance}",
                                                 "body": {"weight": "${weight}", "reason": "${alertname}"}}}},
            "worker": {"poll_s": 0.2, "verify_delay_s": 0.5},
        })
        store = Store(f"sqlite:///{tmp_path / 'rx.db'}")
        app = create_app(policy, store, actuator=build_actuator(policy), metrics_source=build_metrics_source(policy),
                         learner=RuleBasedLearner(), token=TOKEN, operators={"ops": OPERATOR})
        with UvicornThread(app) as srv:
            yield {"url": srv.url, "lb": lb, "instance": instance}
        store.close()


def _alert(instance: str) -> dict[str, Any]:
    starts = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    labels = {"alertname": "VllmOtelFailurePredicted", "failure_type": "queue_overload", "instance": instance,
              "severity": "warning"}
    fp = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    return {"receiver": "vllm-otel", "status": "firing", "groupLabels": {"alertname": labels["alertname"]},
            "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://127.0.0.1:9093",
            "version": "4", "groupKey": '{}:{alertname="VllmOtelFailurePredicted"}', "truncatedAlerts": 0,
            "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "predicted"},
                        "startsAt": starts, "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://127.0.0.1:9090/graph", "fingerprint": fp}]}


def test_the_custom_strategy_acts_through_a_real_receiver(receiver_with_custom_strategy: dict) -> None:
    """A predicted queue overload -> the receiver picks `shift_traffic` -> the hook reaches the load
    balancer with the instance and weight -> verified on vLLM's real /metrics -> recorded."""
    rx = receiver_with_custom_strategy
    r = httpx.post(f"{rx['url']}/webhook", json=_alert(rx["instance"]), timeout=10,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    act: dict[str, Any] = {}
    while time.monotonic() < deadline:
        acts = httpx.get(f"{rx['url']}/actions", headers={"Authorization": f"Bearer {OPERATOR}"},
                         timeout=10).json()["actions"]
        act = next((a for a in acts if a["strategy"] == "shift_traffic" and a["outcome"]), {})
        if act:
            break
        time.sleep(0.3)
    assert act.get("outcome") == "success", act
    assert act["result"]["data"]["weight"] == 0.25
    calls = [c for c in rx["lb"].received if c["path"] == "/members/" + rx["instance"].replace(":", "%3A")]
    assert calls and calls[0]["payload"] == {"weight": 0.25, "reason": "VllmOtelFailurePredicted"}, rx["lb"].received


def test_the_monitoring_example_against_a_real_server(vllm_server: Any, prometheus: Any) -> None:
    """Requests, /monitoring/status, our series on /metrics, and the forecaster's predictions from
    Prometheus' history of the same server."""
    from tests.conftest import CONTROL_TOKEN  # the session vLLM's monitoring routes want it

    # The forecaster predicts from at least 12 points of a signal: when this test is the first to
    # start the session's Prometheus, give it half a minute of scrapes first.
    prometheus.wait_for('count_over_time(vllm:num_requests_running{job="vllm"}[2m])',
                        lambda res: bool(res) and float(res[0]["value"][1]) >= 30, timeout_s=90)
    r = subprocess.run([sys.executable, str(EXAMPLES / "monitoring_example.py"), "--url", vllm_server.url,
                        "--token", CONTROL_TOKEN,
                        "--prometheus", prometheus.url, "--selector", 'job="vllm"', "--min-history", "5",
                        "--requests", "6", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["completions"] == 6
    assert out["status"]["engines"], out["status"]
    assert "vllm_otel_engine_stalled" in out["vllm_otel_series"]
    units = out["predictions"]["instances"]
    assert [u["unit"] for u in units] == [f"127.0.0.1:{vllm_server.port}"]
    probs = [v["probability"] for v in units[0]["failures"].values() if v["probability"] is not None]
    assert probs and all(0.0 <= p <= 1.0 for p in probs)
    text = subprocess.run([sys.executable, str(EXAMPLES / "monitoring_example.py"), "--url", vllm_server.url,
                           "--token", CONTROL_TOKEN, "--requests", "1"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "1 completions" in text.stdout and "engine 0: lifecycle" in text.stdout


@pytest.mark.vllm
def test_the_monitoring_example_offline(tiny_model: Path) -> None:
    pytest.importorskip("vllm")
    r = subprocess.run([sys.executable, str(EXAMPLES / "monitoring_example.py"), "--offline", str(tiny_model),
                        "--requests", "3", "--json"], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert out["completions"] == 3
    assert out["status"]["enabled"] is True
    assert out["status"]["engines"]["0"]["finished_requests"] == {"length": 3}
