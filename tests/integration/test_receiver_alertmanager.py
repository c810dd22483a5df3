"""A real uvicorn server fed the exact body Alertmanager 0.25 posts, and a real Alertmanager
delivering to the receiver with a bearer token file."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from tests.receiver_support import I2, TOKEN, Env, wait_actions
from vllm_otel.testing.services import UvicornThread


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
        acts = wait_actions(srv.url, lambda a: a and a[0]["outcome"])
        assert acts[0]["outcome"] == "success" and acts[0]["alert"]["fingerprint"] == "df46d0ab3a0ca2d7"
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'vllm_otel_mitigations_total{outcome="success",strategy="poke"} 1.0' in metrics
        assert 'vllm_otel_receiver_store_up 1.0' in metrics
        assert httpx.get(f"{srv.url}/healthz").json() == {
            "status": "ok", "replica": env.store.replica_id, "store": "ok", "worker": "running"}


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
        acts = wait_actions(srv.url, lambda a: a and a[0]["outcome"], timeout_s=20)
        assert acts[0]["outcome"] == "success" and acts[0]["alert"]["instance"] == I2
    assert env.actuator.calls == [(I2, "poke", {"level": 1})]
    assert env.metric("vllm_otel_receiver_webhooks_total", code="202") >= 1
