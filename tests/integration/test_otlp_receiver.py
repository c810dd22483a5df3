"""The OTLP test receiver, exercised with the REAL OpenTelemetry SDK and REAL OTLP exporters.

Every test builds its own providers (never the global ones) and shuts them down. Exports are
driven by the SDK's own processors/readers (BatchSpanProcessor, SimpleSpanProcessor,
PeriodicExportingMetricReader, BatchLogRecordProcessor) over real gRPC and HTTP connections.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import grpc
import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from vllm_otel.testing.otlp import OtlpReceiver

pytestmark = pytest.mark.timeout(60)

RESOURCE = Resource.create({"service.name": "otlp-receiver-test", "deployment.environment": "test"})


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def span_exporter(receiver: OtlpReceiver, transport: str, **kw):  # noqa: ANN003, ANN201
    if transport == "grpc":
        return GrpcSpanExporter(endpoint=receiver.grpc_endpoint, **kw)
    return HttpSpanExporter(endpoint=receiver.http_url("traces"), **kw)


def metric_exporter(receiver: OtlpReceiver, transport: str, **kw):  # noqa: ANN003, ANN201
    if transport == "grpc":
        return GrpcMetricExporter(endpoint=receiver.grpc_endpoint, **kw)
    return HttpMetricExporter(endpoint=receiver.http_url("metrics"), **kw)


def _post(url: str, body: bytes, content_type: str, encoding: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    if encoding:
        req.add_header("Content-Encoding", encoding)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport,compression", [
    ("grpc", None), ("grpc", grpc.Compression.Gzip),
    ("http", None), ("http", HttpCompression.Gzip), ("http", HttpCompression.Deflate),
])
def test_spans_arrive_with_attributes_events_parent_and_resource(receiver: OtlpReceiver, transport: str,
                                                                   compression) -> None:  # noqa: ANN001
    kw = {"compression": compression} if compression is not None else {}
    exporter = span_exporter(receiver, transport, headers={"authorization": "Bearer s3cret"}, timeout=5, **kw)
    tp = TracerProvider(resource=RESOURCE)
    tp.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    try:
        tracer = tp.get_tracer("vllm_otel.test", "1.2.3")
        with tracer.start_as_current_span("llm_request", kind=SpanKind.SERVER) as parent:
            parent.set_attribute("gen_ai.request.model", "tiny")
            parent.set_attribute("gen_ai.usage.input_tokens", 42)
            parent.set_attribute("vllm.ttft_s", 0.125)
            parent.set_attribute("vllm.stream", True)
            parent.set_attribute("vllm.stop", ["</s>", "\n"])
            parent.add_event("first_token", {"token.index": 0})
            with tracer.start_as_current_span("engine.step") as child:
                child.set_status(Status(StatusCode.ERROR, "preempted"))
        assert tp.force_flush(5000)
        spans = receiver.wait_for_spans(lambda s: s["name"] in ("llm_request", "engine.step"), count=2)
    finally:
        tp.shutdown()

    by_name = {s["name"]: s for s in spans}
    p, c = by_name["llm_request"], by_name["engine.step"]
    ctx = parent.get_span_context()
    assert p["trace_id"] == format(ctx.trace_id, "032x") and p["span_id"] == format(ctx.span_id, "016x")
    assert p["parent_span_id"] is None
    assert c["trace_id"] == p["trace_id"] and c["parent_span_id"] == p["span_id"]
    assert p["kind"] == "server" and c["kind"] == "internal"
    assert p["attributes"] == {"gen_ai.request.model": "tiny", "gen_ai.usage.input_tokens": 42,
                               "vllm.ttft_s": 0.125, "vllm.stream": True, "vllm.stop": ["</s>", "\n"]}
    assert [(e["name"], e["attributes"]) for e in p["events"]] == [("first_token", {"token.index": 0})]
    assert p["start_ns"] <= p["events"][0]["time_ns"] <= p["end_ns"]
    assert p["start_ns"] <= c["start_ns"] <= c["end_ns"] <= p["end_ns"]
    assert c["status"] == {"code": "error", "message": "preempted"}
    assert p["resource"]["service.name"] == "otlp-receiver-test"
    assert p["resource"]["deployment.environment"] == "test"
    assert p["scope"] == {"name": "vllm_otel.test", "version": "1.2.3", "attributes": {}}
    assert p["transport"] == transport

    assert receiver.headers(), "export metadata/headers must be recorded"
    assert all(h.get("authorization") == "Bearer s3cret" for h in receiver.headers("traces"))
    reqs = receiver.requests("traces")
    if transport == "http":
        expected = {None: "none", HttpCompression.Gzip: "gzip", HttpCompression.Deflate: "deflate"}[compression]
        assert {r.compression for r in reqs} == {expected}
        assert all(r.encoding == "protobuf" for r in reqs)
    assert receiver.accepted_count("traces", transport) == len(reqs) >= 1


def test_logs_over_grpc(receiver: OtlpReceiver) -> None:
    lp = LoggerProvider(resource=RESOURCE)
    lp.add_log_record_processor(BatchLogRecordProcessor(GrpcLogExporter(endpoint=receiver.grpc_endpoint),
                                                        schedule_delay_millis=50))
    try:
        lp.get_logger("vllm_otel.logs").emit(body="engine restarted", severity_number=SeverityNumber.WARN,
                                             severity_text="WARN", attributes={"restarts": 2})
        assert lp.force_flush(5000)
        (log,) = receiver.wait_for_logs(lambda r: r["body"] == "engine restarted")
    finally:
        lp.shutdown()
    assert log["attributes"] == {"restarts": 2}
    assert log["severity_text"] == "WARN" and log["severity_number"] == SeverityNumber.WARN.value
    assert log["resource"]["service.name"] == "otlp-receiver-test"


def test_otlp_json_over_http(receiver: OtlpReceiver) -> None:
    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]},
        "scopeSpans": [{"scope": {"name": "json"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "parentSpanId": "eee19b7ec3c1b173", "name": "json-span", "kind": 2,
            "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
            "attributes": [{"key": "n", "value": {"intValue": "7"}},
                           {"key": "xs", "value": {"arrayValue": {"values": [{"doubleValue": 1.5}]}}}],
            "someFutureField": 1}]}]}]}
    status, raw = _post(receiver.http_url("traces"), json.dumps(body).encode(), "application/json")
    assert status == 200 and json.loads(raw) == {}
    (span,) = receiver.spans("json-span")
    assert span["trace_id"] == "5b8efff798038103d269b633813fc60c" and span["span_id"] == "eee19b7ec3c1b174"
    assert span["parent_span_id"] == "eee19b7ec3c1b173" and span["kind"] == "server"
    assert span["attributes"] == {"n": 7, "xs": [1.5]} and span["duration_ns"] == 1_000_000_000
    assert span["resource"] == {"service.name": "json-svc"}
    assert receiver.requests("traces")[0].encoding == "json"


def test_bad_requests_are_rejected_and_counted(receiver: OtlpReceiver) -> None:
    url = receiver.http_url("traces")
    assert _post(url, b"\xff\xff\xff", "application/x-protobuf")[0] == 400
    assert _post(url, b"not gzip", "application/x-protobuf", "gzip")[0] == 400
    assert _post(url, b"", "text/plain")[0] == 415
    assert _post(receiver.http_endpoint + "/v1/nothing", b"", "application/x-protobuf")[0] == 404
    # an empty-but-valid gzip'd protobuf request is fine
    ok = gzip.compress(trace_service_pb2.ExportTraceServiceRequest().SerializeToString())
    assert _post(url, ok, "application/x-protobuf", "gzip")[0] == 200
    assert receiver.stats()["bad_requests"] == 3
    assert receiver.spans() == []


def test_storage_is_bounded() -> None:
    small = OtlpReceiver(max_items=3).start()
    tp = TracerProvider(resource=RESOURCE)
    tp.add_span_processor(SimpleSpanProcessor(span_exporter(small, "grpc")))
    try:
        for i in range(5):
            tp.get_tracer("t").start_span(f"s{i}").end()
        assert [s["name"] for s in small.spans()] == ["s2", "s3", "s4"]
        st = small.stats()
        assert st["accepted"] == 5 and st["stored_items"] == 3 and st["dropped_items"] == 2
        small.clear()
        assert small.spans() == [] and small.stats()["accepted"] == 0
    finally:
        tp.shutdown()
        small.stop()


def test_wait_times_out_fast_with_a_useful_message(receiver: OtlpReceiver) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="spans"):
        receiver.wait_for_spans(lambda s: s["name"] == "never", timeout_s=0.2)
    assert time.monotonic() - t0 < 1.0
    # predicates that look up missing keys count as "no match", not as errors
    with pytest.raises(TimeoutError):
        receiver.wait_for_metrics(lambda m: m["attributes"]["missing"] == 1, timeout_s=0.05)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_counter_and_histogram_with_explicit_buckets(receiver: OtlpReceiver, transport: str,
                                                     temporality: str) -> None:
    kw = {}
    if temporality == "delta":
        kw["preferred_temporality"] = {Counter: AggregationTemporality.DELTA,
                                       Histogram: AggregationTemporality.DELTA}
    if transport == "http":
        kw["compression"] = HttpCompression.Gzip
    exporter = metric_exporter(receiver, transport, headers={"x-api-key": "k1"}, **kw)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=100)
    mp = MeterProvider(metric_readers=[reader], resource=RESOURCE)
    tp = TracerProvider(resource=RESOURCE)  # for exemplars: measurements inside a sampled span
    try:
        meter = mp.get_meter("vllm_otel.test")
        counter = meter.create_counter("vllm.requests", unit="{request}", description="requests seen")
        hist = meter.create_histogram("vllm.ttft", unit="s", description="time to first token",
                                      explicit_bucket_boundaries_advisory=[0.1, 0.5, 1.0])
        attrs = {"model": "tiny", "finish_reason": "stop"}
        with tp.get_tracer("t").start_as_current_span("req") as span:
            counter.add(5, attrs)
            for v in (0.05, 0.3, 0.3, 2.0):
                hist.record(v, {"model": "tiny"})

        (c1,) = receiver.wait_for_metrics(lambda m: m["name"] == "vllm.requests" and m["value"] == 5)[:1]
        counter.add(3, attrs)
        second = 8 if temporality == "cumulative" else 3
        receiver.wait_for_metrics(lambda m: m["name"] == "vllm.requests" and m["value"] == second
                                  and m["time_ns"] > c1["time_ns"])
        (h,) = receiver.wait_for_metrics(lambda m: m["name"] == "vllm.ttft")[:1]
    finally:
        mp.shutdown()
        tp.shutdown()

    assert c1["type"] == "sum" and c1["monotonic"] is True and c1["temporality"] == temporality
    assert c1["unit"] == "{request}" and c1["description"] == "requests seen"
    assert c1["attributes"] == attrs and isinstance(c1["value"], int)
    assert c1["resource"]["service.name"] == "otlp-receiver-test" and c1["scope"]["name"] == "vllm_otel.test"
    values = [m["value"] for m in receiver.metrics("vllm.requests")]
    assert (8 in values) == (temporality == "cumulative")

    assert h["type"] == "histogram" and h["temporality"] == temporality and h["unit"] == "s"
    assert h["explicit_bounds"] == [0.1, 0.5, 1.0]
    assert h["bucket_counts"] == [1, 2, 0, 1]
    assert h["count"] == 4 and h["sum"] == pytest.approx(2.65)
    assert h["min"] == 0.05 and h["max"] == 2.0
    assert h["attributes"] == {"model": "tiny"}
    trace_hex = format(span.get_span_context().trace_id, "032x")
    assert h["exemplars"] and {e["trace_id"] for e in h["exemplars"]} == {trace_hex}
    assert {e["value"] for e in h["exemplars"]} <= {0.05, 0.3, 2.0}

    assert {"vllm.requests", "vllm.ttft"} <= receiver.metric_names()
    assert all(hd.get("x-api-key") == "k1" for hd in receiver.headers("metrics"))
    if transport == "http":
        assert {r.compression for r in receiver.requests("metrics")} == {"gzip"}


# ---------------------------------------------------------------------------------------------
# failure injection
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_set_status_makes_exports_fail_and_counts_attempts(receiver: OtlpReceiver, transport: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    tp = TracerProvider(resource=RESOURCE)
    tp.add_span_processor(SimpleSpanProcessor(span_exporter(receiver, transport, timeout=5)))
    tracer = tp.get_tracer("t")
    try:
        # Retryable (503 / UNAVAILABLE) with a short Retry-After: the exporter retries 6 times, then gives up.
        receiver.set_status(503, retry_after_s=0.02)
        with caplog.at_level(logging.WARNING):
            t0 = time.monotonic()
            tracer.start_span("lost").end()
            elapsed = time.monotonic() - t0
        assert receiver.rejected_count("traces", transport) == 6
        assert elapsed < 3.0
        assert any("Failed to export" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        assert {a.status for a in receiver.attempts("traces")} == {503 if transport == "http" else "UNAVAILABLE"}
        assert receiver.spans() == []

        # Non-retryable (400 / INVALID_ARGUMENT): one attempt, failure logged.
        receiver.clear()
        caplog.clear()
        receiver.set_status(400)
        with caplog.at_level(logging.WARNING):
            tracer.start_span("rejected").end()
        assert receiver.rejected_count() == 1 and receiver.accepted_count() == 0
        assert {a.status for a in receiver.attempts()} == {400 if transport == "http" else "INVALID_ARGUMENT"}
        if transport == "http":
            # (the gRPC exporter's logger has a DuplicateFilter: the same "Failed to export" message
            # within ~20 s is logged once, so only the HTTP exporter logs this second failure)
            assert any("Failed to export" in r.getMessage() for r in caplog.records)

        # Fail twice, then succeed: the exporter's own retry gets the span through.
        receiver.clear()
        receiver.set_status(grpc.StatusCode.UNAVAILABLE, retry_after_s=0.01, times=2)
        tracer.start_span("retried").end()
        assert [s["name"] for s in receiver.spans()] == ["retried"]
        assert receiver.rejected_count() == 2 and receiver.accepted_count() == 1

        # Only metrics failing leaves traces alone; set_status(None) heals everything.
        receiver.set_status(503, signals=["metrics"])
        tracer.start_span("ok-1").end()
        receiver.set_status(None)
        tracer.start_span("ok-2").end()
        assert {"ok-1", "ok-2"} <= receiver.span_names()
    finally:
        tp.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_required_headers(receiver: OtlpReceiver, transport: str) -> None:
    receiver.require_headers({"authorization": "Bearer good"})
    good = TracerProvider(resource=RESOURCE)
    good.add_span_processor(SimpleSpanProcessor(span_exporter(receiver, transport,
                                                              headers={"authorization": "Bearer good"})))
    bad = TracerProvider(resource=RESOURCE)
    bad.add_span_processor(SimpleSpanProcessor(span_exporter(receiver, transport,
                                                             headers={"authorization": "Bearer bad"})))
    try:
        bad.get_tracer("t").start_span("bad").end()
        good.get_tracer("t").start_span("good").end()
    finally:
        good.shutdown()
        bad.shutdown()
    assert receiver.span_names() == {"good"}
    assert {a.status for a in receiver.attempts() if not a.accepted} == {401 if transport == "http" else
                                                                          "UNAUTHENTICATED"}
    assert [h["authorization"] for h in receiver.headers(accepted_only=True)] == ["Bearer good"]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_slow_receiver_is_bounded_by_exporter_timeout(receiver: OtlpReceiver, transport: str) -> None:
    receiver.set_delay(2.0)
    tp = TracerProvider(resource=RESOURCE)
    tp.add_span_processor(SimpleSpanProcessor(span_exporter(receiver, transport, timeout=0.3)))
    try:
        t0 = time.monotonic()
        tp.get_tracer("t").start_span("slow").end()  # SimpleSpanProcessor exports inline
        elapsed = time.monotonic() - t0
        assert 0.25 < elapsed < 1.5, elapsed
        receiver.set_delay(0)
        tp.get_tracer("t").start_span("fast").end()
        assert "fast" in receiver.span_names()
    finally:
        tp.shutdown()


def test_pause_holds_exports_until_resume(receiver: OtlpReceiver) -> None:
    tp = TracerProvider(resource=RESOURCE)
    tp.add_span_processor(SimpleSpanProcessor(span_exporter(receiver, "grpc", timeout=10)))
    try:
        receiver.pause()
        done = threading.Event()
        worker = threading.Thread(target=lambda: (tp.get_tracer("t").start_span("held").end(), done.set()))
        worker.start()
        assert not done.wait(0.3), "a paused receiver must not answer"
        assert receiver.spans() == []
        receiver.resume()
        assert done.wait(5)
        worker.join(5)
        assert receiver.wait_for_spans(lambda s: s["name"] == "held", timeout_s=2)
    finally:
        receiver.resume()
        tp.shutdown()


def test_stop_then_restart_on_the_same_ports(receiver: OtlpReceiver) -> None:
    grpc_port, http_port = receiver.grpc_port, receiver.http_port
    tps = {}
    for transport in ("grpc", "http"):
        tps[transport] = TracerProvider(resource=RESOURCE)
        tps[transport].add_span_processor(SimpleSpanProcessor(span_exporter(receiver, transport, timeout=0.5)))
    try:
        for transport, tp in tps.items():  # warm connections (HTTP keep-alive, gRPC channel)
            tp.get_tracer("t").start_span(f"before-{transport}").end()
        assert receiver.span_names() == {"before-grpc", "before-http"}

        receiver.stop()
        for transport, tp in tps.items():  # collector down: fails fast, no hang
            t0 = time.monotonic()
            tp.get_tracer("t").start_span(f"down-{transport}").end()
            assert time.monotonic() - t0 < 2.0
        assert not receiver.running

        receiver.start()
        assert (receiver.grpc_port, receiver.http_port) == (grpc_port, http_port)
        for transport, tp in tps.items():
            tp.get_tracer("t").start_span(f"after-{transport}").end()
        assert receiver.span_names() == {"before-grpc", "before-http", "after-grpc", "after-http"}

        # A brand-new receiver can take over the same fixed ports, too.
        receiver.stop()
        with OtlpReceiver(grpc_port=grpc_port, http_port=http_port) as again:
            assert again.grpc_endpoint == f"http://127.0.0.1:{grpc_port}"
            for transport, tp in tps.items():
                tp.get_tracer("t").start_span(f"new-{transport}").end()
            assert again.span_names() == {"new-grpc", "new-http"}
    finally:
        for tp in tps.values():
            tp.shutdown()


def test_endpoints_and_env(receiver: OtlpReceiver) -> None:
    assert receiver.grpc_endpoint == f"http://127.0.0.1:{receiver.grpc_port}"
    assert receiver.http_endpoint == f"http://127.0.0.1:{receiver.http_port}"
    assert receiver.http_url("metrics") == receiver.http_endpoint + "/v1/metrics"
    assert receiver.otel_env("grpc")["OTEL_EXPORTER_OTLP_ENDPOINT"] == receiver.grpc_endpoint
    assert receiver.otel_env("http/protobuf")["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    with urllib.request.urlopen(receiver.http_endpoint + "/health", timeout=5) as resp:
        assert resp.status == 200
