"""What the OTEL_* variables ask for, read the way the OpenTelemetry specification says.

What the SDK does not read by itself and we therefore read here: ``OTEL_SDK_DISABLED``,
``OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_PROTOCOL``, ``OTEL_TRACES_EXPORTER`` /
``OTEL_METRICS_EXPORTER`` (``none`` turns a signal off) and ``OTEL_METRIC_EXPORT_INTERVAL``.
The exporters read endpoint, headers, timeout, compression and certificates themselves;
``Resource.create()`` reads ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``; the metric
exporters read ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``; the TracerProvider reads
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``.

OTLP export is on only when an endpoint is configured: a Prometheus-only user gets no connection
errors to a collector they do not run.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["OtelSettings", "build_resource"]

logger = logging.getLogger("vllm_otel.telemetry")
_PROTOCOLS = {"grpc", "http/protobuf"}


@dataclass(frozen=True)
class OtelSettings:
    traces_enabled: bool
    metrics_enabled: bool
    traces_protocol: str
    metrics_protocol: str
    export_interval_ms: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OtelSettings":
        env = os.environ if env is None else env
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"

        def proto(signal: str) -> str:
            p = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                 or "http/protobuf").strip().lower()
            if p not in _PROTOCOLS:
                logger.warning("vllm-otel: unsupported OTLP protocol %r for %s; using http/protobuf", p, signal)
                p = "http/protobuf"
            return p

        def enabled(signal: str, exporter_var: str) -> bool:
            if disabled:
                return False
            names = {n.strip().lower() for n in env.get(exporter_var, "otlp").split(",")}
            if "none" in names or "otlp" not in names:
                return False
            return bool(env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))

        try:
            interval = int(float(env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")))
        except ValueError:
            logger.warning("vllm-otel: bad OTEL_METRIC_EXPORT_INTERVAL; using 60000 ms")
            interval = 60000
        return cls(traces_enabled=enabled("TRACES", "OTEL_TRACES_EXPORTER"),
                   metrics_enabled=enabled("METRICS", "OTEL_METRICS_EXPORTER"),
                   traces_protocol=proto("TRACES"), metrics_protocol=proto("METRICS"),
                   export_interval_ms=max(interval, 100))


def build_resource(extra: Mapping[str, Any] | None = None) -> Any:
    """Resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES over our defaults.

    Our defaults tell vLLM instances apart (``service.instance.id`` = host:port of the server,
    host name, pid, model); anything the user sets through the standard variables wins.
    """
    from opentelemetry.sdk.resources import Resource

    attrs: dict[str, Any] = {"service.name": "vllm", "host.name": socket.gethostname(),
                             "process.pid": os.getpid()}
    attrs.update({k: v for k, v in (extra or {}).items() if v is not None})
    detected = dict(Resource.create({}).attributes)
    user_set = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in user_set:
        detected.pop("service.name", None)  # the SDK's "unknown_service:python" placeholder
    if "service.instance.id" in attrs and "service.instance.id=" not in user_set:
        detected.pop("service.instance.id", None)  # a random uuid the SDK made up
    attrs.update(detected)
    return Resource(attrs)
