"""A real OTLP receiver (gRPC + HTTP) for tests, built on the official ``opentelemetry-proto`` services.

No OpenTelemetry Collector binary is available everywhere tests run, so this package serves the
three OTLP collector services itself. Where each part lives:

* :mod:`.receiver` -- :class:`OtlpReceiver`: lifecycle (start/stop on the same ports), endpoints;
* :mod:`.grpc_service` -- OTLP/gRPC with the official generated servicers on a ``grpc.server``;
* :mod:`.http_service` -- OTLP/HTTP ``POST /v1/{traces,metrics,logs}`` on a ``ThreadingHTTPServer``;
* :mod:`.wire` -- signal names, request/response messages, OTLP/HTTP body decoding;
* :mod:`.flatten` -- the official proto messages decoded into plain dicts;
* :mod:`.received` -- what was received, and the queries and ``wait_for_*`` tests use;
* :mod:`.faults` -- failure injection (rejections, delays, a hung collector, required headers).
"""

from vllm_otel.testing.otlp.flatten import any_value_to_python
from vllm_otel.testing.otlp.received import ExportAttempt, ReceivedRequest
from vllm_otel.testing.otlp.receiver import OtlpReceiver
from vllm_otel.testing.otlp.wire import SIGNALS

__all__ = ["OtlpReceiver", "ReceivedRequest", "ExportAttempt", "any_value_to_python", "SIGNALS"]
