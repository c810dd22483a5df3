"""OTLP/gRPC: the official generated ``TraceService``, ``MetricsService`` and ``LogsService`` servicers.

They come from the ``opentelemetry.proto.collector.*.v1.*_pb2_grpc`` modules and run on a
``grpc.server`` with a thread pool. A rejected export is answered with the injected status code
(and a ``google.rpc.RetryInfo`` trailer when a retry hint is set); a stopping receiver answers
``UNAVAILABLE``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from vllm_otel.testing.otlp.flatten import count_items
from vllm_otel.testing.otlp.received import ReceivedRequest
from vllm_otel.testing.otlp.wire import MAX_BODY, RESPONSE_TYPES

if TYPE_CHECKING:
    from vllm_otel.testing.otlp.receiver import OtlpReceiver, RunState

__all__ = ["serve_grpc"]


def _grpc_export(receiver: OtlpReceiver, run: RunState, signal: str, request: Message,
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
    rec = ReceivedRequest(signal, "grpc", request, headers, time.time(), count_items(signal, request))
    receiver._record_attempt(signal, "grpc", True, "OK", headers, rec)
    return RESPONSE_TYPES[signal]()


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver, run: RunState) -> None:
        self._receiver, self._run = receiver, run

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201 - generated API
        return _grpc_export(self._receiver, self._run, "traces", request, context)


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver, run: RunState) -> None:
        self._receiver, self._run = receiver, run

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201
        return _grpc_export(self._receiver, self._run, "metrics", request, context)


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver, run: RunState) -> None:
        self._receiver, self._run = receiver, run

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201
        return _grpc_export(self._receiver, self._run, "logs", request, context)


def serve_grpc(receiver: OtlpReceiver, run: RunState, host: str, port: int, workers: int) -> int:
    """Bind ``host:port`` (0: a free port) and serve; returns the bound port. ``OSError`` if it cannot bind."""
    run.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc")
    server = grpc.server(run.executor, options=[
        ("grpc.max_receive_message_length", MAX_BODY),
        # A stale receiver must not silently share the port with a new one.
        ("grpc.so_reuseport", 0),
    ])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(receiver, run), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(receiver, run), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(receiver, run), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # newer grpcio raises instead of returning 0
        raise OSError(f"OTLP gRPC receiver cannot bind {host}:{port}: {exc}") from exc
    if not bound:
        raise OSError(f"OTLP gRPC receiver cannot bind {host}:{port}")
    run.grpc_server = server
    server.start()
    return bound
