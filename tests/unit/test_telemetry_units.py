"""Unit behaviour of the in-vLLM telemetry pieces, with the real OpenTelemetry SDK."""

from __future__ import annotations

import time

import pytest

from vllm_otel.telemetry import BoundedSpanProcessor, ExportStats, OtelSettings, build_resource
from vllm_otel.instrument.requests import RequestContextMiddleware, RequestRegistry, candidate_keys
from vllm_otel.instrument.stall import ProgressState, StallDetector


# ---- OTEL_* variables ---------------------------------------------------------------------------
def test_no_endpoint_means_no_otlp_export():
    s = OtelSettings.from_env({})
    assert not s.traces_enabled and not s.metrics_enabled


@pytest.mark.parametrize("env, traces, metrics", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none"}, True, False),
])
def test_standard_variables_switch_signals(env, traces, metrics):
    s = OtelSettings.from_env(env)
    assert (s.traces_enabled, s.metrics_enabled) == (traces, metrics)


def test_protocol_and_interval_variables():
    s = OtelSettings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                               "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
                               "OTEL_METRIC_EXPORT_INTERVAL": "1500"})
    assert s.traces_protocol == "grpc" and s.metrics_protocol == "http/protobuf"
    assert s.export_interval_ms == 1500
    assert OtelSettings.from_env({}).traces_protocol == "http/protobuf"  # the spec's default
    assert OtelSettings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}).traces_protocol == "http/protobuf"


def test_resource_defaults_yield_to_user_variables(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    r = build_resource({"service.instance.id": "h:8000", "vllm.model.name": "m"}).attributes
    assert r["service.name"] == "vllm" and r["service.instance.id"] == "h:8000"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chat-prod")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7,deployment.environment=prod")
    r = build_resource({"service.instance.id": "h:8000"}).attributes
    assert r["service.name"] == "chat-prod"
    assert r["service.instance.id"] == "pod-7"
    assert r["deployment.environment"] == "prod"


# ---- bounded span export ---------------------------------------------------------------------------
class _SlowExporter:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.exported = 0

    def export(self, batch):  # noqa: ANN001, ANN201
        from opentelemetry.sdk.trace.export import SpanExportResult

        time.sleep(self.delay)
        self.exported += len(batch)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_slow_collector_never_blocks_and_drops_are_counted():
    """A stuck exporter (stand-in for a hung collector at the exporter boundary) must not slow
    span ends; the queue stays bounded and every drop is counted."""
    from opentelemetry.sdk.trace import TracerProvider

    stats = ExportStats()
    proc = BoundedSpanProcessor(_SlowExporter(delay=5.0), stats, max_queue=100, batch=10, delay_s=0.01)
    tp = TracerProvider()
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("t")
    t0 = time.perf_counter()
    for _ in range(2000):
        tracer.start_span("s").end()
    per_span_us = (time.perf_counter() - t0) / 2000 * 1e6
    assert per_span_us < 500, per_span_us  # the app thread never waits for the exporter
    assert proc.queue_size() <= 100
    assert stats.dropped["traces"] >= 2000 - 100 - 10
    proc._queue.clear()
    proc._stop = True


# ---- request context ---------------------------------------------------------------------------------
def test_candidate_keys_match_vllm_request_ids():
    assert candidate_keys("cmpl-abc123-0") == ["cmpl-abc123-0", "abc123-0", "abc123"]
    assert "my-own-id" in candidate_keys("chatcmpl-my-own-id")


def test_registry_is_bounded():
    r = RequestRegistry(max_entries=3)
    from vllm_otel.instrument.requests import RequestInfo

    for i in range(5):
        r.put(str(i), RequestInfo("chat", "/v1/chat/completions", time.time()))
    assert len(r) == 3 and r.evicted == 2
    assert r.pop("cmpl-4-0") is not None and r.pop("cmpl-0-0") is None


@pytest.mark.parametrize("status", [200, 400])
def test_middleware_records_context_and_forgets_rejected(status):
    import asyncio

    reg = RequestRegistry()
    seen_headers = {}

    async def app(scope, receive, send):  # noqa: ANN001
        seen_headers.update({k.decode(): v.decode() for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def noop(*a):  # noqa: ANN002
        return None

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]}
    asyncio.run(RequestContextMiddleware(app, registry=reg)(scope, noop, noop))
    rid = seen_headers["x-request-id"]  # injected so vLLM uses an id we can find again
    info = reg.pop(f"chatcmpl-{rid}-0")
    if status == 400:
        assert info is None  # rejected before the engine: must not look like pending work
    else:
        assert info.operation == "chat" and info.traceparent.startswith("00-0af7")
        assert info.closed  # answered: kept for the span, but no longer pending work


def test_an_abandoned_request_is_no_pending_work_but_an_open_one_is():
    import asyncio

    reg = RequestRegistry()
    gate = asyncio.Event()

    async def app(scope, receive, send):  # noqa: ANN001 - waits, as a request in the engine does
        await gate.wait()

    async def noop(*a):  # noqa: ANN002
        return None

    async def main() -> None:
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        task = asyncio.create_task(RequestContextMiddleware(app, registry=reg)(scope, noop, noop))
        await asyncio.sleep(0.01)
        assert reg.oldest_received(300) is not None  # the client waits: pending work
        task.cancel()  # the client went away before vLLM knew of it (no abort reaches us)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert reg.oldest_received(300) is None and len(reg) == 1

    asyncio.run(main())


# ---- stall detection ---------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_stall_flagged_after_timeout_and_cleared_on_progress():
    clock = _Clock()
    st = ProgressState(running=2, waiting=1, last_report=clock.t, last_progress=clock.t)
    changes = []
    det = StallDetector(lambda: {0: st}, timeout_s=5, on_change=lambda *a: changes.append(a), clock=clock)
    clock.t += 4.9
    det.check()
    assert not st.stalled
    clock.t += 0.2
    det.check()
    assert st.stalled and changes[-1][:2] == (0, True)
    st.last_progress = clock.t  # a token arrives
    det.check()
    assert not st.stalled and changes[-1][:2] == (0, False)
    assert st.stall_events == 1


def test_idle_engine_is_never_stalled():
    clock = _Clock()
    st = ProgressState(running=0, waiting=0, last_report=clock.t, last_progress=clock.t)
    det = StallDetector(lambda: {0: st}, timeout_s=1, clock=clock)
    clock.t += 3600
    det.check()
    assert not st.stalled


def test_silent_engine_with_unacknowledged_request_is_stalled():
    clock = _Clock()
    st = ProgressState(running=0, waiting=0, last_report=clock.t, last_progress=clock.t)
    pending = [None]
    det = StallDetector(lambda: {0: st}, timeout_s=2, clock=clock,
                        pending_since=lambda since: pending[0] if pending[0] is not None and pending[0] >= since else None)
    clock.t += 10
    pending[0] = clock.t  # a request arrives; the engine never reports it
    clock.t += 1
    det.check()
    assert not st.stalled
    clock.t += 1.5
    det.check()
    assert st.stalled


def test_engine_that_froze_after_reporting_idle_with_a_request_in_the_front_end_is_stalled():
    """Seen for real: a request accepted just before the engine's last report ("0 running,
    0 waiting"), still in the front end, then the engine core froze. It must not hide the stall."""
    clock = _Clock()
    st = ProgressState(running=0, waiting=0, last_report=clock.t, last_progress=clock.t)
    pending = [clock.t - 0.5]  # accepted before the last report, never finished

    def pending_since(since: float) -> float | None:
        return pending[0] if pending[0] >= since else None

    det = StallDetector(lambda: {0: st}, timeout_s=2, pending_since=pending_since, clock=clock)
    clock.t += 1.0
    det.check()
    assert not st.stalled
    clock.t += 1.5  # the engine silent for 2.5 s > 2 s, the request older than 2 s
    det.check()
    assert st.stalled
    # It reports again (progress): not stalled any more, even with the request still pending.
    st.last_report = st.last_progress = clock.t
    det.check()
    assert not st.stalled
    # A lost entry (accepted long before the engine's last report) never makes an idle engine
    # look stalled.
    clock.t += 3600
    det.check()
    assert not st.stalled


# ---- per-request spans ------------------------------------------------------------------------------
def _request_spans(sampler):  # noqa: ANN001, ANN202
    from opentelemetry.sdk.resources import Resource

    from vllm_otel.instrument.tracing import RequestSpans
    from vllm_otel.telemetry import ExportStats

    sent: list = []
    stats = ExportStats()
    rs = RequestSpans(sampler, lambda req: sent.append(req) or True, stats, Resource({"service.name": "vllm"}),
                      ("vllm_otel", "0"), "tiny", "127.0.0.1", 8000, delay_s=60)
    return rs, sent, stats


def _flat(sent):  # noqa: ANN001, ANN202
    """What a collector decodes from the requests (wire format) the spans were sent in."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from vllm_otel.testing.otlp.flatten import flatten_spans

    return [s for req in sent for s in flatten_spans(ExportTraceServiceRequest.FromString(req))]


def test_request_spans_follow_semconv_and_continue_the_client_trace():
    pytest.importorskip("vllm")
    from opentelemetry.sdk.trace.sampling import ParentBased, ALWAYS_ON
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats

    from vllm_otel.instrument.requests import RequestInfo

    b, sent, stats = _request_spans(ParentBased(ALWAYS_ON))
    fin = FinishedRequestStats(finish_reason=FinishReason.LENGTH, request_id="cmpl-x-0", e2e_latency=1.0,
                               num_prompt_tokens=100, num_generation_tokens=20, max_tokens_param=20,
                               queued_time=0.2, prefill_time=0.1, inference_time=0.7, decode_time=0.6,
                               mean_time_per_output_token=0.03, num_preemptions=2)
    info = RequestInfo("chat", "/v1/chat/completions", 0.0,
                       traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", tracestate="k=v")
    ids = b.record(fin, end_s=2000.0, engine=0, info=info)
    assert ids is not None and format(ids[0], "032x") == "0af7651916cd43dd8448eb211c80319c"
    b.flush()
    spans = {s["name"]: s for s in _flat(sent)}
    root = spans["chat tiny"]
    assert root["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and root["kind"] == "server"
    assert root["parent_span_id"] == "b7ad6b7169203331" and root["trace_state"] == "k=v"
    assert root["span_id"] == format(ids[1], "016x")  # what the histograms' exemplars point at
    a = root["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "vllm"
    assert a["gen_ai.usage.input_tokens"] == 100 and a["gen_ai.usage.output_tokens"] == 20
    assert a["gen_ai.response.finish_reasons"] == ["length"] and a["server.port"] == 8000
    assert "gen_ai.usage.prompt_tokens" not in a  # deprecated names are not emitted
    assert root["duration_ns"] / 1e9 == pytest.approx(1.0)
    assert root["resource"]["service.name"] == "vllm" and root["scope"]["name"] == "vllm_otel"
    assert root["flags"] == 0x301 and spans["queued"]["flags"] == 0x101  # sampled; parent remote or not
    assert [e["attributes"] for e in root["events"]][1:] == [{"vllm.request.num_preemptions": 2},
                                                              {"finish_reason": "length"}]
    assert a["gen_ai.response.id"] == "cmpl-x-0" and a["gen_ai.request.max_tokens"] == 20
    for phase, dur in (("queued", 0.2), ("prefill", 0.1), ("decode", 0.6)):
        assert spans[phase]["parent_span_id"] == root["span_id"] and spans[phase]["kind"] == "internal"
        assert spans[phase]["duration_ns"] / 1e9 == pytest.approx(dur, abs=1e-6)
    assert [e["name"] for e in root["events"]] == ["first_token", "preempted", "finished"]
    assert stats.exported["traces"] == 4

    sent.clear()
    aborted = FinishedRequestStats(finish_reason=FinishReason.ABORT, request_id="cmpl-y-0", e2e_latency=0.5,
                                   queued_time=0.5)
    b.record(aborted, end_s=2001.0, engine=1, info=None)
    b.flush()
    root = next(s for s in _flat(sent) if s["name"].endswith(" tiny"))
    assert root["attributes"]["error.type"] == "aborted" and root["attributes"]["vllm.engine"] == 1
    assert root["status"] == {"code": "error", "message": "abort"} and root["parent_span_id"] is None
    b.shutdown()


@pytest.mark.parametrize("sampler_name, arg, parent_flag, sampled", [
    ("always_off", None, "01", False),
    ("traceidratio", "0", "01", False),
    ("parentbased_traceidratio", "0", "01", True),   # the client sampled it: we continue
    ("parentbased_always_on", None, "00", False),    # the client did not: neither do we
    ("parentbased_always_on", None, None, True),
])
def test_request_spans_honour_otel_traces_sampler(monkeypatch, sampler_name, arg, parent_flag, sampled):
    pytest.importorskip("vllm")
    from opentelemetry.sdk.trace import TracerProvider
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats

    from vllm_otel.instrument.requests import RequestInfo

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler_name)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    b, sent, stats = _request_spans(TracerProvider().sampler)  # the SDK reads the variables
    tp = f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{parent_flag}" if parent_flag else None
    fin = FinishedRequestStats(finish_reason=FinishReason.STOP, request_id="cmpl-z-0", e2e_latency=0.1)
    ids = b.record(fin, end_s=10.0, engine=0, info=RequestInfo("chat", "/v1/chat/completions", 0.0, traceparent=tp))
    b.flush()
    assert (ids is not None) is sampled and bool(_flat(sent)) is sampled
    b.shutdown()
