"""The OTLP wire: signal names, request/response messages, and OTLP/HTTP body decoding.

Error policy: a body that cannot be decoded raises ``ValueError`` (the HTTP server answers 400);
an unsupported ``Content-Type`` or ``Content-Encoding`` raises ``LookupError`` (answered 415).
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

__all__ = ["SIGNALS", "REQUEST_TYPES", "RESPONSE_TYPES", "HTTP_PATHS", "MAX_BODY", "decode_body", "decompress"]

SIGNALS = ("traces", "metrics", "logs")

REQUEST_TYPES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceRequest,
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
}
RESPONSE_TYPES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceResponse,
    "metrics": metrics_service_pb2.ExportMetricsServiceResponse,
    "logs": logs_service_pb2.ExportLogsServiceResponse,
}
HTTP_PATHS = {"/v1/traces": "traces", "/v1/metrics": "metrics", "/v1/logs": "logs"}

MAX_BODY = 64 * 1024 * 1024

# OTLP/JSON encodes these bytes fields as hex strings, not base64 (the protobuf JSON default).
_HEX_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


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


def decode_body(signal: str, body: bytes, content_type: str) -> tuple[Message, str]:
    """Parse an OTLP/HTTP body; returns (request, encoding) or raises ValueError."""
    req = REQUEST_TYPES[signal]()
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


def decompress(body: bytes, encoding: str) -> bytes:
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
