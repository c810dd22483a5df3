"""The in-process monitor fed with vLLM's real stats objects (no server): accounting, status,
export_data, Prometheus series, and coexistence with vLLM's own tracing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

pytest.importorskip("vllm")
from vllm.v1.engine import FinishReason  # noqa: E402
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats  # noqa: E402

from vllm_otel.config import MonitorConfig  # noqa: E402
from vllm_otel.instrument.monitor import EngineMonitor  # noqa: E402


def _config(otlp_traces_endpoint=None):  # noqa: ANN001, ANN202
    return SimpleNamespace(
        model_config=SimpleNamespace(served_model_name=["tiny"], model="/m"),
        cache_config=SimpleNamespace(block_size=128, num_gpu_blocks=10),
        observability_config=SimpleNamespace(otlp_traces_endpoint=otlp_traces_endpoint),
        parallel_config=SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1, data_parallel_size=1))


@pytest.fixture()
def monitor(monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    reg = CollectorRegistry()
    m = EngineMonitor(_config(), MonitorConfig(stall_timeout_s=5), registry=reg)
    m.engine(0)
    m.on_engine_initialized(0)
    yield m, reg
    m.shutdown()


def _step(m: EngineMonitor, running: int, waiting: int, kv: float, tokens: int, finished=()) -> None:  # noqa: ANN001
    ss = SchedulerStats(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=kv)
    it = IterationStats()
    it.num_generation_tokens = tokens
    it.finished_requests.extend(finished)
    m.on_step(ss, it, 0)


def test_accounting_status_and_prometheus(monitor, tmp_path):
    m, reg = monitor
    _step(m, 3, 2, 0.5, 3)
    done = FinishedRequestStats(finish_reason=FinishReason.STOP, request_id="cmpl-a-0", e2e_latency=0.4,
                                num_prompt_tokens=10, num_generation_tokens=5)
    gone = FinishedRequestStats(finish_reason=FinishReason.ABORT, request_id="cmpl-b-0", e2e_latency=0.1)
    _step(m, 1, 0, 0.2, 1, finished=[done, gone])
    m.on_client_abort(["cmpl-c-0"])
    st = m.get_engine_status()
    e = st["engines"]["0"]
    assert e["finished_requests"] == {"stop": 1, "abort": 2}
    assert e["aborted_requests"] == 2 and st["active_requests"] == 1
    assert st["parallel"]["tensor_parallel_size"] == 2
    labels = {"model_name": "tiny", "engine": "0"}
    assert reg.get_sample_value("vllm_otel_requests_aborted_total", labels) == 2
    assert reg.get_sample_value("vllm_otel_requests_finished_total", {**labels, "finish_reason": "stop"}) == 1
    assert reg.get_sample_value("vllm_otel_kv_cache_headroom_tokens", labels) == pytest.approx(0.8 * 10 * 128)
    assert reg.get_sample_value("vllm_otel_engine_stalled", labels) == 0
    path = m.export_data(tmp_path / "export.json")
    data = json.loads(path.read_text())
    assert data["status"]["engines"]["0"]["aborted_requests"] == 2
    states = [h["to_state"] for h in data["lifecycle"]["0"]["history"]]
    assert states[-1] in ("idle", "ready") and "warming_up" in states


def test_lifecycle_follows_load(monitor):
    m, reg = monitor
    _step(m, 4, 3, 0.95, 4)
    eng = m.engines[0]
    assert m._serving_state(eng).value == "saturated"
    _step(m, 2, 0, 0.4, 2)
    assert m._serving_state(eng).value == "serving"
    _step(m, 0, 0, 0.0, 0)
    assert m._serving_state(eng).value == "idle"


def test_vllm_native_tracing_means_no_second_request_span(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    m = EngineMonitor(_config(otlp_traces_endpoint="http://127.0.0.1:9"), MonitorConfig(),
                      registry=CollectorRegistry())
    try:
        assert m.vllm_tracing is True
        assert m.span_builder is None and m.tracer_provider is None  # vLLM emits llm_request itself
        assert m.meter_provider is not None  # metrics still flow
        from opentelemetry import trace

        # We never installed a global provider.
        assert not type(trace.get_tracer_provider()).__module__.startswith("opentelemetry.sdk")
    finally:
        m.shutdown()
