"""A real OTLP receiver (gRPC + HTTP) for tests, built on the official ``opentelemetry-proto`` services.

No OpenTelemetry Collector binary is available everywhere tests run, so this module serves the
three OTLP collector services itself:

* gRPC: ``TraceService``, ``MetricsService`` and ``LogsService`` from the generated
  ``opentelemetry.proto.collector.*.v1.*_pb2_grpc`` modules, on a ``grpc.server`` with a thread pool;
* OTLP/HTTP: ``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs`` with ``application/x-protobuf``
  (or OTLP/JSON ``application/json``) bodies, ``gzip``/``deflate`` content encoding, on a
  ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive, TCP_NODELAY) in a daemon thread.

Everything received is stored (bounded by ``max_items`` spans + data points + log records) as the
decoded protobuf request, together with the request headers / gRPC metadata. Accessors flatten the
protos into plain Python dicts (:meth:`OtlpReceiver.spans`, :meth:`~OtlpReceiver.metrics`,
:meth:`~OtlpReceiver.logs`) and ``wait_for_*`` block on a condition variable until what a test
expects has arrived.

Failure injection, to prove that a down, failing or slow collector never slows the exporter's host:

* :meth:`~OtlpReceiver.set_status` -- reject exports (default HTTP 503 / gRPC ``UNAVAILABLE``),
  optionally with a ``Retry-After`` / ``RetryInfo`` hint, only for some signals or only N times;
* :meth:`~OtlpReceiver.set_delay` -- answer every export only after a delay (a slow collector);
* :meth:`~OtlpReceiver.pause` / :meth:`~OtlpReceiver.resume` -- hold every export without answering
  (a hung collector) until resumed;
* :meth:`~OtlpReceiver.stop` then :meth:`~OtlpReceiver.start` again -- the receiver goes down
  (connection refused, open keep-alive connections are cut) and comes back on the *same* ports;
  a new ``OtlpReceiver(grpc_port=..., http_port=...)`` on the old ports works as well.

No global state: every receiver owns its servers, threads, locks and data.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OtlpReceiver", "ReceivedRequest", "ExportAttempt", "any_value_to_python", "SIGNALS"]

SIGNALS = ("traces", "metrics", "logs")

_REQUEST_TYPES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceRequest,
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
}
_RESPONSE_TYPES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceResponse,
    "metrics": metrics_service_pb2.ExportMetricsServiceResponse,
    "logs": logs_service_pb2.ExportLogsServiceResponse,
}
_HTTP_PATHS = {"/v1/traces": "traces", "/v1/metrics": "metrics", "/v1/logs": "logs"}

_MAX_BODY = 64 * 1024 * 1024

_HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "unspecified",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}
_STATUS_CODES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "unset",
    trace_pb2.Status.STATUS_CODE_OK: "ok",
    trace_pb2.Status.STATUS_CODE_ERROR: "error",
}
_TEMPORALITIES = {
    metrics_pb2.AGGREGATION_TEMPORALITY_UNSPECIFIED: "unspecified",
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: "delta",
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
}
# OTLP/JSON encodes these bytes fields as hex strings, not base64 (the protobuf JSON default).
_HEX_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


# --------------------------------------------------------------------------------------------
# Flattening helpers (pure functions)
# --------------------------------------------------------------------------------------------

def any_value_to_python(value: common_pb2.AnyValue) -> Any:
    """Convert an OTLP ``AnyValue`` into the matching plain Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value_to_python(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attrs(value.kvlist_value.values)
    return getattr(value, kind)


def _attrs(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value_to_python(kv.value) for kv in kvs}


def _hex(raw: bytes) -> str | None:
    return raw.hex() if raw else None


def _scope(scope: common_pb2.InstrumentationScope) -> dict[str, Any]:
    return {"name": scope.name, "version": scope.version, "attributes": _attrs(scope.attributes)}


def _flatten_spans(req: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = _scope(ss.scope)
            for sp in ss.spans:
                out.append({
                    "name": sp.name,
                    "trace_id": sp.trace_id.hex(),
                    "span_id": sp.span_id.hex(),
                    "parent_span_id": _hex(sp.parent_span_id),
                    "trace_state": sp.trace_state,
                    "flags": sp.flags,
                    "kind": _SPAN_KINDS.get(sp.kind, str(sp.kind)),
                    "start_ns": sp.start_time_unix_nano,
                    "end_ns": sp.end_time_unix_nano,
                    "duration_ns": sp.end_time_unix_nano - sp.start_time_unix_nano,
                    "attributes": _attrs(sp.attributes),
                    "dropped_attributes_count": sp.dropped_attributes_count,
                    "events": [{"name": ev.name, "time_ns": ev.time_unix_nano,
                                "attributes": _attrs(ev.attributes)} for ev in sp.events],
                    "links": [{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex(),
                               "attributes": _attrs(ln.attributes)} for ln in sp.links],
                    "status": {"code": _STATUS_CODES.get(sp.status.code, str(sp.status.code)),
                               "message": sp.status.message},
                    "resource": resource,
                    "scope": scope,
                })
    return out


def _exemplars(exs: Iterable[metrics_pb2.Exemplar]) -> list[dict[str, Any]]:
    out = []
    for ex in exs:
        which = ex.WhichOneof("value")
        out.append({
            "trace_id": _hex(ex.trace_id),
            "span_id": _hex(ex.span_id),
            "value": getattr(ex, which) if which else None,
            "time_ns": ex.time_unix_nano,
            "attributes": _attrs(ex.filtered_attributes),
        })
    return out


def _number_value(dp: metrics_pb2.NumberDataPoint) -> int | float | None:
    which = dp.WhichOneof("value")
    return getattr(dp, which) if which else None


def _flatten_metrics(req: metrics_service_pb2.ExportMetricsServiceRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rm in req.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            scope = _scope(sm.scope)
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                base = {"name": m.name, "unit": m.unit, "description": m.description,
                        "resource": resource, "scope": scope}
                if kind in ("sum", "gauge"):
                    data = getattr(m, kind)
                    temporality = (_TEMPORALITIES.get(data.aggregation_temporality)
                                   if kind == "sum" else None)
                    monotonic = data.is_monotonic if kind == "sum" else None
                    for dp in data.data_points:
                        out.append({**base, "type": kind, "temporality": temporality,
                                    "monotonic": monotonic, "attributes": _attrs(dp.attributes),
                                    "start_ns": dp.start_time_unix_nano, "time_ns": dp.time_unix_nano,
                                    "value": _number_value(dp), "exemplars": _exemplars(dp.exemplars)})
                elif kind == "histogram":
                    temporality = _TEMPORALITIES.get(m.histogram.aggregation_temporality)
                    for dp in m.histogram.data_points:
                        out.append({**base, "type": "histogram", "temporality": temporality,
                                    "monotonic": None, "attributes": _attrs(dp.attributes),
                                    "start_ns": dp.start_time_unix_nano, "time_ns": dp.time_unix_nano,
                                    "count": dp.count,
                                    "sum": dp.sum if dp.HasField("sum") else None,
                                    "min": dp.min if dp.HasField("min") else None,
                                    "max": dp.max if dp.HasField("max") else None,
                                    "bucket_counts": list(dp.bucket_counts),
                                    "explicit_bounds": list(dp.explicit_bounds),
                                    "exemplars": _exemplars(dp.exemplars)})
                elif kind == "exponential_histogram":
                    temporality = _TEMPORALITIES.get(m.exponential_histogram.aggregation_temporality)
                    for dp in m.exponential_histogram.data_points:
                        out.append({**base, "type": "exp_histogram", "temporality": temporality,
                                    "monotonic": None, "attributes": _attrs(dp.attributes),
                                    "start_ns": dp.start_time_unix_nano, "time_ns": dp.time_unix_nano,
                                    "count": dp.count,
                                    "sum": dp.sum if dp.HasField("sum") else None,
                                    "min": dp.min if dp.HasField("min") else None,
                                    "max": dp.max if dp.HasField("max") else None,
                                    "scale": dp.scale, "zero_count": dp.zero_count,
                                    "positive": {"offset": dp.positive.offset,
                                                 "bucket_counts": list(dp.positive.bucket_counts)},
                                    "negative": {"offset": dp.negative.offset,
                                                 "bucket_counts": list(dp.negative.bucket_counts)},
                                    "exemplars": _exemplars(dp.exemplars)})
                elif kind == "summary":
                    for dp in m.summary.data_points:
                        out.append({**base, "type": "summary", "temporality": None, "monotonic": None,
                                    "attributes": _attrs(dp.attributes),
                                    "start_ns": dp.start_time_unix_nano, "time_ns": dp.time_unix_nano,
                                    "count": dp.count, "sum": dp.sum,
                                    "quantiles": [(q.quantile, q.value) for q in dp.quantile_values],
                                    "exemplars": []})
                else:  # a metric without data: keep its name visible
                    out.append({**base, "type": None, "temporality": None, "monotonic": None,
                                "attributes": {}, "exemplars": []})
    return out


def _flatten_logs(req: logs_service_pb2.ExportLogsServiceRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rl in req.resource_logs:
        resource = _attrs(rl.resource.attributes)
        for sl in rl.scope_logs:
            scope = _scope(sl.scope)
            for lr in sl.log_records:
                out.append({
                    "body": any_value_to_python(lr.body) if lr.HasField("body") else None,
                    "severity_number": int(lr.severity_number),
                    "severity_text": lr.severity_text,
                    "event_name": lr.event_name,
                    "attributes": _attrs(lr.attributes),
                    "trace_id": _hex(lr.trace_id),
                    "span_id": _hex(lr.span_id),
                    "time_ns": lr.time_unix_nano,
                    "observed_time_ns": lr.observed_time_unix_nano,
                    "resource": resource,
                    "scope": scope,
                })
    return out


_FLATTENERS: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
    "traces": _flatten_spans, "metrics": _flatten_metrics, "logs": _flatten_logs,
}


def _count_items(signal: str, req: Any) -> int:
    if signal == "traces":
        return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    if signal == "logs":
        return sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                n += len(getattr(m, kind).data_points) if kind else 1
    return n


def _hex_ids_to_base64(obj: Any) -> Any:
    """OTLP/JSON -> protobuf-JSON: trace/span ids are hex strings in OTLP/JSON."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _HEX_ID_KEYS and isinstance(v, str):
                try:
                    v = base64.b64encode(bytes.fromhex(v)).decode("ascii")
                except ValueError:
                    pass  # not hex: leave it for the protobuf parser to judge
            else:
                v = _hex_ids_to_base64(v)
            out[k] = v
        return out
    if isinstance(obj, list):
        return [_hex_ids_to_base64(v) for v in obj]
    return obj


def _decode_body(signal: str, body: bytes, content_type: str) -> tuple[Message, str]:
    """Parse an OTLP/HTTP body; returns (request, encoding) or raises ValueError."""
    req = _REQUEST_TYPES[signal]()
    if content_type in ("application/x-protobuf", "application/protobuf"):
        try:
            req.ParseFromString(body)
        except DecodeError as exc:
            raise ValueError(f"invalid protobuf body: {exc}") from exc
        return req, "protobuf"
    if content_type == "application/json":
        try:
            json_format.ParseDict(_hex_ids_to_base64(json.loads(body or b"{}")), req,
                                  ignore_unknown_fields=True)
        except (ValueError, json_format.ParseError) as exc:
            raise ValueError(f"invalid OTLP/JSON body: {exc}") from exc
        return req, "json"
    raise LookupError(content_type)


def _decompress(body: bytes, encoding: str) -> bytes:
    if encoding in ("", "identity", "none"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate
    raise LookupError(encoding)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

@dataclass
class ReceivedRequest:
    """One accepted export request, as decoded from the wire."""

    signal: str                 # "traces" | "metrics" | "logs"
    transport: str              # "grpc" | "http"
    request: Message            # the ExportXServiceRequest proto
    headers: dict[str, str]     # lower-cased HTTP headers or gRPC invocation metadata
    time: float                 # time.time() when it was accepted
    items: int                  # spans / metric data points / log records in it
    encoding: str = "protobuf"  # "protobuf" | "json"
    compression: str = "none"   # HTTP Content-Encoding ("gzip", "deflate", "none"); gRPC: "none"
    seq: int = -1               # arrival order, unique per receiver
    _flat: list[dict[str, Any]] | None = field(default=None, repr=False)

    def flat(self) -> list[dict[str, Any]]:
        """The request's items flattened to plain dicts (cached and shared: do not mutate them)."""
        if self._flat is None:
            items = _FLATTENERS[self.signal](self.request)
            for it in items:
                it["transport"] = self.transport
            self._flat = items
        return self._flat


@dataclass(frozen=True)
class ExportAttempt:
    """Every export call the receiver saw, accepted or not."""

    signal: str
    transport: str
    accepted: bool
    status: int | str           # HTTP status code, or gRPC status code name ("OK", "UNAVAILABLE")
    headers: dict[str, str]
    time: float


@dataclass
class _Failure:
    http_status: int
    grpc_code: grpc.StatusCode
    message: str
    retry_after_s: float | None
    signals: frozenset[str]
    remaining: int | None       # None: until set_status(None)


class _RunState:
    """Per start()/stop() cycle, so that handlers of an old run never see a new run's state."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.grpc_server: grpc.Server | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.http_server: _TrackingHTTPServer | None = None
        self.http_thread: threading.Thread | None = None


class _TrackingHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that can cut its open keep-alive connections on stop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients going away (timeouts, stop()) are normal here; don't spray tracebacks


# --------------------------------------------------------------------------------------------
# The receiver
# --------------------------------------------------------------------------------------------

class OtlpReceiver:
    """OTLP/gRPC + OTLP/HTTP receiver on loopback that records what exporters send.

    ``grpc_port``/``http_port`` 0 pick free ports on the first :meth:`start`; later starts reuse
    the same ports. Pass ``grpc_port=None`` or ``http_port=None`` to not serve that transport.
    """

    def __init__(self, host: str = "127.0.0.1", grpc_port: int | None = 0, http_port: int | None = 0,
                 max_items: int = 100_000, grpc_workers: int = 16) -> None:
        self.host = host
        self._grpc_port = grpc_port
        self._http_port = http_port
        self.max_items = max_items
        self._grpc_workers = grpc_workers

        self._cond = threading.Condition()
        self._gen = 0
        self._seq = 0
        self._epoch = 0  # bumped by clear()
        self._records: deque[ReceivedRequest] = deque()
        self._attempts: deque[ExportAttempt] = deque(maxlen=max(1, max_items))
        self._items = 0
        self._dropped_items = 0
        self._bad_requests = 0
        self._counts: dict[tuple[str, str, bool], int] = {}

        self._failure: _Failure | None = None
        self._delay_s = 0.0
        self._required_headers: dict[str, str] = {}
        self._resumed = threading.Event()
        self._resumed.set()
        self._run: _RunState | None = None
        self._life_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> "OtlpReceiver":
        """Bind and serve. Idempotent; after :meth:`stop` it comes back on the same ports."""
        with self._life_lock:
            if self._run is not None:
                return self
            run = _RunState()
            try:
                if self._grpc_port is not None:
                    self._grpc_port = self._start_grpc(run, self._grpc_port)
                if self._http_port is not None:
                    self._http_port = self._start_http(run, self._http_port)
            except BaseException:
                self._teardown(run)
                raise
            self._run = run
            return self

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop serving: listeners close, in-flight/held exports are cut, ports are released."""
        with self._life_lock:
            run, self._run = self._run, None
        if run is not None:
            self._teardown(run, grace_s)

    close = stop

    def restart(self) -> "OtlpReceiver":
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self._run is not None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _start_grpc(self, run: _RunState, port: int) -> int:
        run.executor = ThreadPoolExecutor(max_workers=self._grpc_workers, thread_name_prefix="otlp-grpc")
        server = grpc.server(run.executor, options=[
            ("grpc.max_receive_message_length", _MAX_BODY),
            # A stale receiver must not silently share the port with a new one.
            ("grpc.so_reuseport", 0),
        ])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self, run), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self, run), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(self, run), server)
        try:
            bound = server.add_insecure_port(f"{self.host}:{port}")
        except RuntimeError as exc:  # newer grpcio raises instead of returning 0
            raise OSError(f"OTLP gRPC receiver cannot bind {self.host}:{port}: {exc}") from exc
        if not bound:
            raise OSError(f"OTLP gRPC receiver cannot bind {self.host}:{port}")
        run.grpc_server = server
        server.start()
        return bound

    def _start_http(self, run: _RunState, port: int) -> int:
        server = _TrackingHTTPServer((self.host, port), _make_http_handler(self, run))
        run.http_server = server
        run.http_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                           name="otlp-http", daemon=True)
        run.http_thread.start()
        return server.server_address[1]

    @staticmethod
    def _teardown(run: _RunState, grace_s: float = 0.0) -> None:
        run.stopping.set()  # wakes handlers held by pause()/set_delay()
        if run.http_server is not None:
            if run.http_thread is not None and run.http_thread.is_alive():
                run.http_server.shutdown()
            run.http_server.server_close()
            run.http_server.close_connections()
        if run.grpc_server is not None:
            run.grpc_server.stop(grace_s or None).wait(5.0)
        if run.executor is not None:
            run.executor.shutdown(wait=False, cancel_futures=True)

    # ---- endpoints --------------------------------------------------------------------------

    @property
    def grpc_port(self) -> int:
        if not self._grpc_port:
            raise RuntimeError("gRPC port not bound yet (call start()) or gRPC disabled")
        return self._grpc_port

    @property
    def http_port(self) -> int:
        if not self._http_port:
            raise RuntimeError("HTTP port not bound yet (call start()) or HTTP disabled")
        return self._http_port

    @property
    def grpc_endpoint(self) -> str:
        """``http://host:port`` -- what ``OTLPSpanExporter(endpoint=...)`` (gRPC) takes."""
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """``http://host:port`` -- the OTLP/HTTP base (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
        return f"http://{self.host}:{self.http_port}"

    def http_url(self, signal: str) -> str:
        """Full signal URL, e.g. ``http://127.0.0.1:PORT/v1/traces`` (what HTTP exporters' ``endpoint=`` takes)."""
        if signal not in SIGNALS:
            raise ValueError(f"unknown signal {signal!r}; expected one of {SIGNALS}")
        return f"{self.http_endpoint}/v1/{signal}"

    def otel_env(self, protocol: str = "grpc") -> dict[str, str]:
        """Environment for a child process's exporters (``protocol``: ``grpc`` or ``http/protobuf``)."""
        if protocol == "grpc":
            return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.grpc_endpoint,
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        if protocol in ("http/protobuf", "http"):
            return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.http_endpoint,
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        raise ValueError(f"unsupported protocol {protocol!r}")

    # ---- failure injection ------------------------------------------------------------------

    def set_status(self, code: int | grpc.StatusCode | None = 503, *, message: str = "injected failure",
                   retry_after_s: float | None = None, signals: Iterable[str] | None = None,
                   times: int | None = None) -> None:
        """Make exports fail (``None``, 200 or ``grpc.StatusCode.OK``: succeed again).

        ``code`` is an HTTP status (mapped to gRPC: 503 -> UNAVAILABLE, 429 -> RESOURCE_EXHAUSTED,
        400 -> INVALID_ARGUMENT, ...) or a ``grpc.StatusCode`` (mapped back to HTTP). Rejected
        exports are not stored but counted (:meth:`rejected_count`, :meth:`attempts`).
        ``retry_after_s`` sends ``Retry-After`` (HTTP) / ``google.rpc.RetryInfo`` (gRPC), which the
        OTel exporters honour as their retry backoff. ``signals`` limits the failure to some of
        ``traces``/``metrics``/``logs``; ``times`` reverts to success after that many rejections.
        """
        if code is None or code == 200 or code == grpc.StatusCode.OK:
            failure = None
        elif isinstance(code, grpc.StatusCode):
            failure = _Failure(_GRPC_TO_HTTP.get(code, 500), code, message, retry_after_s,
                               frozenset(signals or SIGNALS), times)
        else:
            code = int(code)
            if not 400 <= code <= 599:
                raise ValueError(f"HTTP failure status must be 4xx/5xx, got {code}")
            failure = _Failure(code, _HTTP_TO_GRPC.get(code, grpc.StatusCode.UNKNOWN), message,
                               retry_after_s, frozenset(signals or SIGNALS), times)
        if failure is not None and not failure.signals <= set(SIGNALS):
            raise ValueError(f"unknown signal(s) {set(failure.signals) - set(SIGNALS)}")
        with self._cond:
            self._failure = failure

    def set_delay(self, seconds: float) -> None:
        """Answer each export only after ``seconds`` (0 disables). stop() cuts waiting exports."""
        with self._cond:
            self._delay_s = max(0.0, float(seconds))

    def pause(self) -> None:
        """Hold every export (accepted, never answered) until :meth:`resume` or :meth:`stop`."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def require_headers(self, headers: Mapping[str, str] | None) -> None:
        """Reject exports lacking these headers/metadata (HTTP 401 / gRPC UNAUTHENTICATED)."""
        with self._cond:
            self._required_headers = {k.lower(): v for k, v in (headers or {}).items()}

    # ---- request handling (shared by both transports) ---------------------------------------

    def _hold(self, run: _RunState) -> bool:
        """Apply pause()/set_delay(). False when the run is stopping meanwhile."""
        while not self._resumed.is_set():
            if run.stopping.is_set():
                return False
            self._resumed.wait(0.05)
        with self._cond:
            delay = self._delay_s
        if delay > 0 and run.stopping.wait(delay):
            return False
        return not run.stopping.is_set()

    def _verdict(self, signal: str, headers: dict[str, str]) -> _Failure | None:
        """Decide, under the lock, whether this export is rejected (and consume a ``times`` use)."""
        with self._cond:
            for k, v in self._required_headers.items():
                if headers.get(k) != v:
                    return _Failure(401, grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong header {k!r}",
                                    None, frozenset(SIGNALS), None)
            f = self._failure
            if f is None or signal not in f.signals:
                return None
            if f.remaining is not None:
                f.remaining -= 1
                if f.remaining <= 0:
                    self._failure = None
            return f

    def _record_attempt(self, signal: str, transport: str, accepted: bool, status: int | str,
                        headers: dict[str, str], request: ReceivedRequest | None = None) -> None:
        with self._cond:
            self._attempts.append(ExportAttempt(signal, transport, accepted, status, headers, time.time()))
            key = (signal, transport, accepted)
            self._counts[key] = self._counts.get(key, 0) + 1
            if request is not None:
                request.seq = self._seq
                self._seq += 1
                self._records.append(request)
                self._items += request.items
                while self._items > self.max_items and len(self._records) > 1:
                    old = self._records.popleft()
                    self._items -= old.items
                    self._dropped_items += old.items
            self._gen += 1
            self._cond.notify_all()

    def _record_bad_request(self) -> None:
        with self._cond:
            self._bad_requests += 1
            self._gen += 1
            self._cond.notify_all()

    # ---- raw access -------------------------------------------------------------------------

    def requests(self, signal: str | None = None) -> list[ReceivedRequest]:
        """Accepted export requests (oldest first), optionally of one signal."""
        with self._cond:
            recs = list(self._records)
        return [r for r in recs if signal is None or r.signal == signal]

    def attempts(self, signal: str | None = None) -> list[ExportAttempt]:
        """Every export call seen (accepted and rejected), oldest first."""
        with self._cond:
            atts = list(self._attempts)
        return [a for a in atts if signal is None or a.signal == signal]

    def headers(self, signal: str | None = None, *, accepted_only: bool = False) -> list[dict[str, str]]:
        """Lower-cased headers (HTTP) / invocation metadata (gRPC) of each export call seen."""
        return [a.headers for a in self.attempts(signal) if a.accepted or not accepted_only]

    def _count(self, accepted: bool, signal: str | None, transport: str | None) -> int:
        with self._cond:
            return sum(n for (s, t, a), n in self._counts.items()
                       if a == accepted and (signal is None or s == signal)
                       and (transport is None or t == transport))

    def accepted_count(self, signal: str | None = None, transport: str | None = None) -> int:
        return self._count(True, signal, transport)

    def rejected_count(self, signal: str | None = None, transport: str | None = None) -> int:
        """Export calls answered with an error by set_status()/require_headers()."""
        return self._count(False, signal, transport)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            by_signal: dict[str, dict[str, int]] = {s: {"accepted": 0, "rejected": 0} for s in SIGNALS}
            for (s, _t, a), n in self._counts.items():
                by_signal[s]["accepted" if a else "rejected"] += n
            return {
                "accepted": sum(v["accepted"] for v in by_signal.values()),
                "rejected": sum(v["rejected"] for v in by_signal.values()),
                "by_signal": by_signal,
                "stored_requests": len(self._records),
                "stored_items": self._items,
                "dropped_items": self._dropped_items,
                "bad_requests": self._bad_requests,
            }

    def clear(self) -> None:
        """Forget everything received and all counters (failure/delay settings stay)."""
        with self._cond:
            self._records.clear()
            self._attempts.clear()
            self._counts.clear()
            self._items = self._dropped_items = self._bad_requests = 0
            self._epoch += 1
            self._gen += 1
            self._cond.notify_all()

    # ---- flattened accessors ----------------------------------------------------------------

    def _items_of(self, signal: str, name: str | None = None) -> list[dict[str, Any]]:
        return [it for r in self.requests(signal) for it in r.flat() if name is None or it.get("name") == name]

    def spans(self, name: str | None = None) -> list[dict[str, Any]]:
        """Received spans, flattened; see the module docs for keys."""
        return self._items_of("traces", name)

    def metrics(self, name: str | None = None) -> list[dict[str, Any]]:
        """Received metric data points (one dict per point), flattened."""
        return self._items_of("metrics", name)

    def logs(self) -> list[dict[str, Any]]:
        return self._items_of("logs")

    def metric_names(self) -> set[str]:
        return {m["name"] for m in self.metrics()}

    def span_names(self) -> set[str]:
        return {s["name"] for s in self.spans()}

    # ---- waiting ----------------------------------------------------------------------------

    def wait_until(self, condition: Callable[["OtlpReceiver"], Any], timeout_s: float = 10.0) -> Any:
        """Block until ``condition(self)`` is truthy (re-checked on every export); return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                gen = self._gen
            result = condition(self)
            if result:
                return result
            with self._cond:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout_s}s; {self._summary_locked()}")
                if self._gen == gen:
                    self._cond.wait(remaining)

    def _wait_items(self, signal: str, predicate: Callable[[dict[str, Any]], Any] | None, count: int,
                    timeout_s: float, what: str) -> list[dict[str, Any]]:
        # Incremental: each wake-up only scans requests that arrived since the last scan.
        deadline = time.monotonic() + timeout_s
        found: list[dict[str, Any]] = []
        last_seq, epoch = -1, None
        while True:
            with self._cond:
                gen = self._gen
                if epoch != self._epoch:  # first pass, or clear() happened: start over
                    epoch, found, last_seq = self._epoch, [], -1
                new: list[ReceivedRequest] = []
                for rec in reversed(self._records):
                    if rec.seq <= last_seq:
                        break
                    new.append(rec)
            for rec in reversed(new):
                if rec.signal == signal:
                    found.extend(it for it in rec.flat() if _match(predicate, it))
            if new:
                last_seq = new[0].seq
            if len(found) >= count:
                return found
            with self._cond:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._gen == gen:
                    self._cond.wait(remaining)
        seen = self._items_of(signal)
        names = sorted({str(it.get("name")) for it in seen})[:40] if signal != "logs" else []
        raise TimeoutError(f"waited {timeout_s}s for {count} {what} matching the predicate, found {len(found)}; "
                           f"received {len(seen)} {what} (names: {names}); {self._summary()}")

    def wait_for_spans(self, predicate: Callable[[dict[str, Any]], Any] | None = None,
                       timeout_s: float = 10.0, *, count: int = 1) -> list[dict[str, Any]]:
        """Block until at least ``count`` spans satisfy ``predicate``; return all matching spans.

        A predicate raising ``KeyError``/``IndexError`` counts as no match. Raises ``TimeoutError``.
        """
        return self._wait_items("traces", predicate, count, timeout_s, "spans")

    def wait_for_metrics(self, predicate: Callable[[dict[str, Any]], Any] | None = None,
                         timeout_s: float = 10.0, *, count: int = 1) -> list[dict[str, Any]]:
        """Block until at least ``count`` metric data points satisfy ``predicate``; return them."""
        return self._wait_items("metrics", predicate, count, timeout_s, "data points")

    def wait_for_logs(self, predicate: Callable[[dict[str, Any]], Any] | None = None,
                      timeout_s: float = 10.0, *, count: int = 1) -> list[dict[str, Any]]:
        return self._wait_items("logs", predicate, count, timeout_s, "log records")

    def wait_for_attempts(self, count: int = 1, timeout_s: float = 10.0, *, signal: str | None = None,
                          accepted: bool | None = None) -> list[ExportAttempt]:
        """Block until ``count`` export calls (optionally only accepted/rejected ones) were seen."""
        def enough(_: OtlpReceiver) -> list[ExportAttempt] | None:
            atts = [a for a in self.attempts(signal) if accepted is None or a.accepted == accepted]
            return atts if len(atts) >= count else None

        return self.wait_until(enough, timeout_s)

    def _summary_locked(self) -> str:
        counts: dict[str, int] = {}
        for (s, _t, a), n in self._counts.items():
            k = f"{s}_{'accepted' if a else 'rejected'}"
            counts[k] = counts.get(k, 0) + n
        return (f"export calls: {counts or 'none'}, bad requests: {self._bad_requests}, "
                f"running: {self._run is not None}")

    def _summary(self) -> str:
        with self._cond:
            return self._summary_locked()

    def __repr__(self) -> str:
        return (f"OtlpReceiver(host={self.host!r}, grpc_port={self._grpc_port}, http_port={self._http_port}, "
                f"running={self.running})")


def _match(predicate: Callable[[dict[str, Any]], Any] | None, item: dict[str, Any]) -> bool:
    if predicate is None:
        return True
    try:
        return bool(predicate(item))
    except LookupError:
        return False


# --------------------------------------------------------------------------------------------
# gRPC services (the official generated servicer base classes)
# --------------------------------------------------------------------------------------------

def _grpc_export(receiver: OtlpReceiver, run: _RunState, signal: str, request: Message,
                 context: grpc.ServicerContext) -> Message:
    headers: dict[str, str] = {}
    for md in context.invocation_metadata() or ():
        value = md.value if isinstance(md.value, str) else md.value.hex()
        headers[md.key.lower()] = value
    if not receiver._hold(run):
        context.abort(grpc.StatusCode.UNAVAILABLE, "receiver stopping")
    failure = receiver._verdict(signal, headers)
    if failure is not None:
        receiver._record_attempt(signal, "grpc", False, failure.grpc_code.name, headers)
        if failure.retry_after_s is not None:
            from google.protobuf.duration_pb2 import Duration
            from google.rpc.error_details_pb2 import RetryInfo

            secs = int(failure.retry_after_s)
            info = RetryInfo(retry_delay=Duration(seconds=secs,
                                                  nanos=int(round((failure.retry_after_s - secs) * 1e9))))
            context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
        context.abort(failure.grpc_code, failure.message)
    rec = ReceivedRequest(signal, "grpc", request, headers, time.time(), _count_items(signal, request))
    receiver._record_attempt(signal, "grpc", True, "OK", headers, rec)
    return _RESPONSE_TYPES[signal]()


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver, run: _RunState) -> None:
        self._receiver, self._run = receiver, run

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201 - generated API
        return _grpc_export(self._receiver, self._run, "traces", request, context)


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver, run: _RunState) -> None:
        self._receiver, self._run = receiver, run

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201
        return _grpc_export(self._receiver, self._run, "metrics", request, context)


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver, run: _RunState) -> None:
        self._receiver, self._run = receiver, run

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201
        return _grpc_export(self._receiver, self._run, "logs", request, context)


# --------------------------------------------------------------------------------------------
# OTLP/HTTP
# --------------------------------------------------------------------------------------------

def _make_http_handler(receiver: OtlpReceiver, run: _RunState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "vllm-otel-otlp-receiver"
        disable_nagle_algorithm = True
        timeout = 60  # idle keep-alive connections close after this

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: bytes = b"", content_type: str = "application/x-protobuf",
                   extra: Iterable[tuple[str, str]] = ()) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, message: str, as_json: bool, extra: Iterable[tuple[str, str]] = ()) -> None:
            from google.rpc import status_pb2

            grpc_code = _HTTP_TO_GRPC.get(code, grpc.StatusCode.UNKNOWN).value[0]
            status = status_pb2.Status(code=grpc_code, message=message)
            if as_json:
                self._reply(code, json_format.MessageToJson(status).encode(), "application/json", extra)
            else:
                self._reply(code, status.SerializeToString(), "application/x-protobuf", extra)

        def _read_body(self) -> bytes | None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    total += size
                    if total > _MAX_BODY:
                        return None
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                return None
            return self.rfile.read(length) if length else b""

        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] in ("/", "/health"):
                self._reply(200, b"ok", "text/plain")
            else:
                self._reply(404 if self.path.split("?", 1)[0] not in _HTTP_PATHS else 405, b"", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            signal = _HTTP_PATHS.get(self.path.split("?", 1)[0].rstrip("/") or "/")
            content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            as_json = content_type == "application/json"
            body = self._read_body()
            if signal is None:
                self._reply(404, b"not found", "text/plain")
                return
            if body is None:
                receiver._record_bad_request()
                self.close_connection = True
                self._error(413, "request body too large", as_json)
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            if not receiver._hold(run):
                self.close_connection = True
                return  # stopping: drop the connection without an answer, like a dying collector
            failure = receiver._verdict(signal, headers)
            if failure is not None:
                receiver._record_attempt(signal, "http", False, failure.http_status, headers)
                extra = []
                if failure.retry_after_s is not None:
                    ra = failure.retry_after_s
                    extra.append(("Retry-After", str(int(ra)) if float(ra).is_integer() else f"{ra:g}"))
                self._error(failure.http_status, failure.message, as_json, extra)
                return
            encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
            try:
                raw = _decompress(body, encoding)
                request, wire = _decode_body(signal, raw, content_type)
            except LookupError as exc:
                receiver._record_bad_request()
                self._error(415, f"unsupported content type/encoding: {exc}", as_json)
                return
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                receiver._record_bad_request()
                self._error(400, str(exc), as_json)
                return
            rec = ReceivedRequest(signal, "http", request, headers, time.time(), _count_items(signal, request),
                                  encoding=wire, compression=encoding or "none")
            receiver._record_attempt(signal, "http", True, 200, headers, rec)
            response = _RESPONSE_TYPES[signal]()
            if wire == "json":
                self._reply(200, json_format.MessageToJson(response).encode(), "application/json")
            else:
                self._reply(200, response.SerializeToString(), "application/x-protobuf")

    return Handler
