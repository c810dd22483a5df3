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
from vllm_otel.instrument.lifecycle import LifecycleState as S  # noqa: E402
from vllm_otel.instrument.monitor import EngineMonitor  # noqa: E402


def _config(otlp_traces_endpoint=None):  # noqa: ANN001, ANN202
    return SimpleNamespace(
        model_config=SimpleNamespace(served_model_name=["tiny"], model="/m"),
        cache_config=SimpleNamespace(block_size=128, num_gpu_blocks=10),
        observability_config=SimpleNamespace(otlp_traces_endpoint=otlp_traces_endpoint),
        parallel_config=SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1, data_parallel_size=1))


@pytest.fixture()
def monitor(monkeypatch):  # noqa: ANN001, ANN201
    from vllm_otel.instrument import phases

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    # This process's phase records so far (other tests') are not this monitor's vLLM's.
    monkeypatch.setattr(phases, "_seen", [])
    monkeypatch.delenv(phases.ENV_OWNER, raising=False)
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
    # No vLLM start-up record was logged here: no start-up phase is claimed.
    assert states == [] and data["lifecycle"]["0"]["state"] == "initializing"


def test_phases_come_from_vllms_records_at_their_time(monitor, monkeypatch):
    """vLLM's own format strings, logged on its logger, move the tracker at the records' times;
    the control endpoint's pause holds the engine without a stall; exit ends in stopped."""
    import logging

    from vllm_otel.instrument import phases

    m, reg = monitor
    phases.install()
    log = logging.getLogger("vllm.entrypoints.launchers.api_server.entry")
    monkeypatch.setattr(log, "level", logging.INFO)
    tracker = m.engines[0].tracker
    rec = log.makeRecord(log.name, logging.INFO, __file__, 1, "Starting vLLM server on %s",
                         ("http://127.0.0.1:1",), None)
    rec.created = tracker.since + 0.25
    log.handle(rec)
    assert tracker.state.value == "ready" and tracker.since == rec.created
    log.info("Some other record %s", "x")
    assert tracker.state.value == "ready"
    m.intervention(S.PAUSED, "control: pause (keep)")
    _step(m, 1, 3, 0.1, 0)
    m.stall.check()
    assert tracker.state.value == "paused" and m.engines[0].progress.stalled is False
    assert reg.get_sample_value("vllm_otel_lifecycle_state", {"instance": "", "engine": "0",
                                                              "state": "paused"}) == 1.0
    m.resume("control: resume")
    assert tracker.state.value == "serving"
    log.info("[shutdown] API server: shutdown triggered")
    m.shutdown()
    assert [t.to_state.value for t in tracker.history()][-2:] == ["shutting_down", "stopped"]


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
        assert m.request_spans is None and m.otel.tracer_provider is None  # vLLM emits llm_request itself
        assert m.meter_provider is not None  # metrics still flow
        from opentelemetry import trace

        # We never installed a global provider.
        assert not type(trace.get_tracer_provider()).__module__.startswith("opentelemetry.sdk")
    finally:
        m.shutdown()
