"""Our routes inside vLLM as someone who reaches its port sees them.

On the session vLLM (control token set, so the monitoring routes want it): no token 401, a wrong
one 403, the right one the lifecycle with its (redacted) launch record; the control endpoint caps
its body, keeps the token budget within what vLLM allocated at start-up.

Without any key (vLLM has no API key and no control token is set), the routes stay open but show
no command line and no environment; and an internal failure of an action is answered 500 with
its reason, not "bad parameters". Those two use our plugin's routes on a real FastAPI app, because
no vLLM here runs without a token (the session one has one) and a real engine cannot be made to
fail on demand: the engine client is replaced at that one boundary, and the test says so.
"""

from __future__ import annotations

import json
from argparse import Namespace
from typing import Any

import httpx
import pytest

from tests.conftest import CONTROL_TOKEN, FAKE_SECRET, MONITORING_AUTH


# --- the session vLLM --------------------------------------------------------------------------

@pytest.mark.vllm
def test_monitoring_routes_want_the_token_when_one_is_set(vllm_server) -> None:  # noqa: ANN001
    for path in ("/monitoring/status", "/monitoring/lifecycle"):
        assert httpx.get(f"{vllm_server.url}{path}", timeout=10).status_code == 401
        assert httpx.get(f"{vllm_server.url}{path}", timeout=10,
                         headers={"Authorization": "Bearer not-it"}).status_code == 403
    r = httpx.get(f"{vllm_server.url}/monitoring/lifecycle", timeout=10, headers=MONITORING_AUTH)
    assert r.status_code == 200
    startup = [c for e in r.json()["engines"].values() for c in e["checkpoints"] if c["label"] == "startup"]
    text = r.text
    assert FAKE_SECRET not in text and CONTROL_TOKEN not in text
    if startup:  # the launch record is there for a key holder, redacted
        assert "environment" in startup[0]["data"]


@pytest.mark.vllm
def test_control_caps_its_body_and_the_budget(vllm_server) -> None:  # noqa: ANN001
    url = f"{vllm_server.url}/monitoring/control"
    big = {"pad": "x" * 20_000}
    r = httpx.post(f"{url}/status", json=big, headers=MONITORING_AUTH, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    status = httpx.post(f"{url}/status", json={}, headers=MONITORING_AUTH, timeout=30).json()["result"]
    budget = status["engine"]["max_num_scheduled_tokens"]
    r = httpx.post(f"{url}/set_token_budget", json={"max_num_batched_tokens": budget * 4},
                   headers=MONITORING_AUTH, timeout=30)
    assert r.status_code == 400 and "allocated at start-up" in r.json()["error"]
    r = httpx.post(f"{url}/set_token_budget", json={"max_num_batched_tokens": "lots"},
                   headers=MONITORING_AUTH, timeout=30)
    assert r.status_code == 400 and "must be an integer" in r.json()["error"]
    r = httpx.post(f"{url}/set_token_budget", json={"max_num_batched_tokens": budget},
                   headers=MONITORING_AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["result"]["after"]["max_num_scheduled_tokens"] == budget
    after = httpx.post(f"{url}/status", json={}, headers=MONITORING_AUTH, timeout=30).json()["result"]
    assert after["engine"]["max_num_scheduled_tokens"] == budget  # unchanged by the refused ones


# --- our routes on a real FastAPI app ----------------------------------------------------------

class _Monitor:
    """The plugin's monitor singleton, holding a real LifecycleTracker with a start-up record."""

    def __init__(self) -> None:
        from vllm_otel.instrument.lifecycle import LifecycleTracker

        self.tracker = LifecycleTracker("127.0.0.1:8000")
        self.tracker.track_startup(["vllm", "serve", "m", "--hf-token", FAKE_SECRET, "--port", "8000"],
                                   {"HF_TOKEN": FAKE_SECRET, "VLLM_HOST_IP": "10.0.0.5"}, {})
        self.tracker.transition("ready", reason="test")

    def get_lifecycle(self) -> dict[str, Any]:
        return {"0": json.loads(self.tracker.to_json())}

    def get_engine_status(self) -> dict[str, Any]:
        return {"model": "m", "argv": ["vllm", "serve"], "engines": {}}


def _app(monkeypatch: pytest.MonkeyPatch, api_key: Any = None, engine: Any = None) -> Any:
    fastapi = pytest.importorskip("fastapi")
    from vllm_otel.instrument import endpoints, monitor

    for var in ("VLLM_API_KEY", "VLLM_OTEL_CONTROL_TOKEN", "VLLM_OTEL_CONTROL_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    if engine is not None:
        monkeypatch.setenv("VLLM_OTEL_CONTROL_TOKEN", CONTROL_TOKEN)
    monkeypatch.setattr(monitor, "_monitor", _Monitor())
    app = fastapi.FastAPI()
    app.state.args = Namespace(api_key=api_key)
    plugin = endpoints.MonitoringEndpoints()
    plugin.attach_router(app)
    plugin._engine_client = engine
    return app


def _get(app: Any, path: str, **kw: Any) -> httpx.Response:
    from starlette.testclient import TestClient

    with TestClient(app) as c:
        return c.get(path, **kw)


def test_without_any_key_no_command_line_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app(monkeypatch)
    r = _get(app, "/monitoring/lifecycle")
    assert r.status_code == 200
    eng = r.json()["engines"]["0"]
    assert eng["state"] == "ready" and eng["history"]
    assert "arguments" not in r.text and "environment" not in r.text and "10.0.0.5" not in r.text
    s = _get(app, "/monitoring/status")
    assert s.status_code == 200 and s.json()["model"] == "m" and "argv" not in s.json()


def test_vllm_api_key_guards_the_monitoring_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app(monkeypatch, api_key=["k-one-123456", "k-two-654321"])  # vLLM takes several keys
    assert _get(app, "/monitoring/lifecycle").status_code == 401
    assert _get(app, "/monitoring/status", headers={"Authorization": "Bearer nope"}).status_code == 403
    r = _get(app, "/monitoring/lifecycle", headers={"Authorization": "Bearer k-two-654321"})
    assert r.status_code == 200
    [data] = [c["data"] for c in r.json()["engines"]["0"]["checkpoints"] if c["label"] == "startup"]
    assert data["environment"]["VLLM_HOST_IP"] == "10.0.0.5" and FAKE_SECRET not in r.text


class _BrokenEngine:
    """Where a real engine cannot be made to fail on demand: an engine client whose prefix-cache
    reset raises a TypeError from inside (a bug), the kind the old code called bad parameters."""

    async def reset_prefix_cache(self) -> bool:
        return None + 1  # type: ignore[operator]


def test_an_internal_failure_is_a_500_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    app = _app(monkeypatch, engine=_BrokenEngine())
    auth = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    with TestClient(app) as c:
        r = c.post("/monitoring/control/reset_prefix_cache", json={}, headers=auth)
        assert r.status_code == 500
        assert "internal error in reset_prefix_cache: TypeError" in r.json()["error"]
        r = c.post("/monitoring/control/reset_prefix_cache", json={"surprise": 1}, headers=auth)
        assert r.status_code == 400 and "bad parameters" in r.json()["error"]
        r = c.post("/monitoring/control/status", content=b"{" + b" " * 20_000 + b"}", headers=auth)
        assert r.status_code == 413
