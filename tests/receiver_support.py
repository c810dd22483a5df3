"""What the receiver's tests (tests/test_receiver_*.py) share: credentials, a recording actuator,
small real test strategies, Alertmanager payloads and :class:`Env`, one receiver app on a store.

What is real in those tests: the Starlette app, the SQLite / PostgreSQL store, uvicorn,
Alertmanager 0.25, the escalation hook (a real HTTP server). What is not: vLLM. Strategies act
through the ``Actuator`` protocol, and these tests put a *recording actuator at that boundary* (it
records each ``call(target, action, params)`` and can be told to fail or to block); the test
strategies below are small real strategies that go through it. Metrics come through the
``MetricsSource`` protocol from a static source whose timestamps we control.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

import httpx
import yaml
from starlette.testclient import TestClient

from vllm_otel.mitigate.records import Target
from vllm_otel.mitigate.policy import Policy
from vllm_otel.mitigate.receiver import create_app
from vllm_otel.mitigate.strategies import (REGISTRY, ActionResult, ActuatorError, Check, MetricsSnapshot,
                                           Strategy, StrategyParams, Verification)
from vllm_otel.mitigate.store import Store


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


def second_firing(instance: str = I1, dt: float = 1.0) -> dict[str, Any]:
    return am_alert(instance=instance, starts=datetime.now(timezone.utc) + timedelta(seconds=dt))


def wait_actions(url: str, pred: Any, timeout_s: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    acts: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        acts = httpx.get(f"{url}/actions", headers=OP_AUTH).json()["actions"]
        if pred(acts):
            return acts
        time.sleep(0.1)
    raise AssertionError(f"no matching actions in {timeout_s} s: {acts}")


def cli_files(tmp_path: Path) -> tuple[Path, Path]:
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


CLI = ("import argparse, sys; from vllm_otel.mitigate.cli import add_parser; "
        "p = argparse.ArgumentParser(); add_parser(p.add_subparsers()); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
