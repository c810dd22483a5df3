"""Publishing the forecaster's latest predictions: Prometheus ``/metrics`` (a custom collector), an
HTTP server for ``/metrics`` and ``/healthz``, and an optional OTLP push of the same gauges.

Everything published is computed by the service's cycle and handed over as one immutable
:class:`Snapshot`; the scrape handler (and the OTLP reader thread) only reads it. The one value
derived at read time is the data age (``now - newest sample``): a subtraction, done there so
that the age keeps growing while a cycle is stuck waiting on a slow source.

Metric families (every per-unit family carries ``instance``, ``engine`` and, for predictions,
``model_name``; ``engine`` is empty unless one server runs several data-parallel engines, and
Prometheus drops empty labels on ingestion):

``vllm_otel_failure_probability{instance,engine,model_name,failure_type}``
    P(the failure within the horizon); 1 while it is happening. Absent: no prediction (too little
    data, or the failure's threshold is not known yet). Never made up.
``vllm_otel_time_to_failure_seconds{...}``
    Seconds until the failure is more likely than not; 0 while it is happening. Absent when that
    does not happen within the horizon.
``vllm_otel_forecast{instance,engine,model_name,signal,quantile}``
    The model's forecast of a signal at the horizon (Gaussian quantiles; latencies in log space).
``vllm_otel_forecaster_prediction_stale{instance,engine}``
    1 when the unit's predictions are the last ones made before its data stopped (source down or
    slow, target not answering). Staleness is a separate gauge rather than a ``stale`` label on the
    predictions so that a prediction series keeps its identity (and an alert its ``for:`` clock)
    when it goes stale: alert on ``... unless on(instance, engine) prediction_stale == 1``.
``vllm_otel_forecaster_data_age_seconds{instance,engine}``
    Seconds since the unit's newest sample; grows while data is missing. A unit is dropped (every
    series of it disappears) once this exceeds the instance TTL.
``vllm_otel_forecaster_up``, ``..._instances``, ``..._horizon_seconds``, ``..._last_cycle_timestamp_seconds``
    Source reachable on the last cycle; units published; the forecast horizon; when the last
    cycle ended. ``..._cycle_duration_seconds`` (histogram), ``..._errors_total{stage}``,
    ``..._cycles_total`` and ``..._refits_total`` are ordinary client metrics (:class:`ServiceMetrics`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

__all__ = ["UnitForecast", "Snapshot", "ForecastCollector", "ServiceMetrics", "MetricsServer",
           "OtlpPublisher", "ERROR_STAGES"]

log = logging.getLogger("vllm_otel.forecast")

# Where a cycle can fail; each has its own errors_total series (initialised at 0).
ERROR_STAGES = ("source", "target", "detector", "forecast", "otlp")

_PRED_LABELS = ["instance", "engine", "model_name", "failure_type"]
_UNIT_LABELS = ["instance", "engine"]


@dataclass(frozen=True)
class UnitForecast:
    """What is published for one unit (an instance, or one engine of it)."""

    unit: str
    instance: str
    engine: str
    model_name: str
    last_data_t: float                          # time of the newest sample (unix seconds)
    stale: bool
    predicted_at: float | None                  # when the published predictions were made
    probability: Mapping[str, float] = field(default_factory=dict)       # failure -> P
    time_to_failure: Mapping[str, float] = field(default_factory=dict)   # failure -> s (within horizon)
    source: Mapping[str, str] = field(default_factory=dict)              # failure -> breach|forecast|...
    forecast: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (signal, quantile) -> value


@dataclass(frozen=True)
class Snapshot:
    """Everything published, as of the end of one cycle."""

    t: float | None                             # end of the last cycle; None before the first
    up: bool
    horizon_s: float
    failure_types: tuple[str, ...]
    units: tuple[UnitForecast, ...] = ()
    last_error: str | None = None


class ForecastCollector(Collector):
    """Publishes the latest :class:`Snapshot` (fetched through ``snapshot()``) on each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot], clock: Callable[[], float] = time.time,
                 registry: CollectorRegistry | None = None) -> None:
        self._snapshot = snapshot
        self._clock = clock
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._snapshot())

    def _families(self, snap: Snapshot | None) -> Iterator[Metric]:
        prob = GaugeMetricFamily("vllm_otel_failure_probability",
                                 "Probability that the failure happens within the forecast horizon "
                                 "(1: happening now)", labels=_PRED_LABELS)
        ttf = GaugeMetricFamily("vllm_otel_time_to_failure_seconds",
                                "Seconds until the failure is more likely than not (0: happening now); "
                                "absent when not within the horizon", labels=_PRED_LABELS)
        fc = GaugeMetricFamily("vllm_otel_forecast", "Forecast of a signal at the horizon, by quantile",
                               labels=["instance", "engine", "model_name", "signal", "quantile"])
        stale = GaugeMetricFamily("vllm_otel_forecaster_prediction_stale",
                                  "1: the unit's data stopped; its predictions are the last ones made",
                                  labels=_UNIT_LABELS)
        age = GaugeMetricFamily("vllm_otel_forecaster_data_age_seconds",
                                "Seconds since the newest sample of the unit", labels=_UNIT_LABELS)
        up = GaugeMetricFamily("vllm_otel_forecaster_up", "1: the data source answered on the last cycle")
        n = GaugeMetricFamily("vllm_otel_forecaster_instances", "Units (instances or engines) published")
        hz = GaugeMetricFamily("vllm_otel_forecaster_horizon_seconds", "How far ahead predictions look")
        last = GaugeMetricFamily("vllm_otel_forecaster_last_cycle_timestamp_seconds",
                                 "Unix time the last cycle ended")
        if snap is not None:
            now = self._clock()
            for u in snap.units:
                for f, p in u.probability.items():
                    prob.add_metric([u.instance, u.engine, u.model_name, f], p)
                for f, s in u.time_to_failure.items():
                    ttf.add_metric([u.instance, u.engine, u.model_name, f], s)
                for (sig, q), v in u.forecast.items():
                    fc.add_metric([u.instance, u.engine, u.model_name, sig, q], v)
                stale.add_metric([u.instance, u.engine], 1.0 if u.stale else 0.0)
                age.add_metric([u.instance, u.engine], max(0.0, now - u.last_data_t))
            up.add_metric([], 1.0 if snap.up else 0.0)
            n.add_metric([], float(len(snap.units)))
            hz.add_metric([], snap.horizon_s)
            if snap.t is not None:
                last.add_metric([], snap.t)
        yield from (prob, ttf, fc, stale, age, up, n, hz, last)


class ServiceMetrics:
    """The forecaster's own counters and cycle-duration histogram, on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter("vllm_otel_forecaster_errors", "Errors by the stage of the cycle they hit",
                              ["stage"], registry=registry)
        for stage in ERROR_STAGES:
            self.errors.labels(stage=stage)
        self.cycle = Histogram("vllm_otel_forecaster_cycle_duration_seconds",
                               "Duration of one forecasting cycle (fetch, detector, refits, publish)",
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                        30.0, 60.0), registry=registry)
        self.cycles = Counter("vllm_otel_forecaster_cycles", "Forecasting cycles run", registry=registry)
        self.refits = Counter("vllm_otel_forecaster_refits", "statsmodels refits done", registry=registry)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Small responses on keep-alive connections: without this, Nagle + delayed ACK cost ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(self.server.registry)
            except Exception:  # noqa: BLE001 - a publishing bug must not kill the server
                log.exception("vllm-otel forecaster: /metrics failed")
                self._send(500, b"collect failed\n", "text/plain")
                return
            self._send(200, body, ctype)
        elif path == "/healthz":
            code, doc = self.server.health()
            self._send(code, (json.dumps(doc) + "\n").encode(), "application/json")
        else:
            self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("forecaster http: " + fmt, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: CollectorRegistry
    health: Callable[[], tuple[int, dict[str, Any]]]


class MetricsServer:
    """``/metrics`` (the registry) and ``/healthz`` (``health()`` -> (status, JSON)) on a thread.

    ``port=0`` picks a free port; :attr:`port` and :attr:`url` say which.
    """

    def __init__(self, registry: CollectorRegistry, health: Callable[[], tuple[int, dict[str, Any]]],
                 host: str = "127.0.0.1", port: int = 9464) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.registry = registry
        self._server.health = health
        self.host = host
        self.port = int(self._server.server_address[1])
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="vllm-otel-forecaster-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class OtlpPublisher:
    """The same gauges pushed over OTLP by a private OTel SDK MeterProvider.

    Configured by the standard variables (``OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT`` / ``_PROTOCOL`` /
    ``_HEADERS``, ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``);
    without an endpoint the exporter's default (localhost:4317 or :4318) is used, since ``--otlp``
    asked for it. The reader thread calls our callbacks, which only read the snapshot. No global
    provider is installed.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], clock: Callable[[], float] = time.time,
                 on_error: Callable[[], None] | None = None) -> None:
        import os

        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from vllm_otel.telemetry import CountingMetricExporter, OtelSettings, build_resource

        settings = OtelSettings.from_env()
        if settings.metrics_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        self._snapshot = snapshot
        self._clock = clock
        self.protocol = settings.metrics_protocol
        interval = settings.export_interval_ms if "OTEL_METRIC_EXPORT_INTERVAL" in os.environ else 15_000
        def counted(ok: bool) -> None:
            if not ok and on_error is not None:
                on_error()

        reader = PeriodicExportingMetricReader(CountingMetricExporter(OTLPMetricExporter(), counted),
                                               export_interval_millis=interval,
                                               export_timeout_millis=min(interval, 10_000))
        resource = build_resource({"service.name": "vllm-otel-forecaster"})
        self.provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self.provider.get_meter("vllm_otel.forecast")

        def attrs(u: UnitForecast, **more: str) -> dict[str, str]:
            a = {"instance": u.instance, "model_name": u.model_name, **more}
            if u.engine:
                a["engine"] = u.engine
            return a

        def units() -> tuple[UnitForecast, ...]:
            return self._snapshot().units

        def probability(_: CallbackOptions) -> list[Observation]:
            return [Observation(p, attrs(u, failure_type=f)) for u in units() for f, p in u.probability.items()]

        def ttf(_: CallbackOptions) -> list[Observation]:
            return [Observation(s, attrs(u, failure_type=f)) for u in units()
                    for f, s in u.time_to_failure.items()]

        def forecast(_: CallbackOptions) -> list[Observation]:
            return [Observation(v, attrs(u, signal=sig, quantile=q)) for u in units()
                    for (sig, q), v in u.forecast.items()]

        def stale(_: CallbackOptions) -> list[Observation]:
            return [Observation(1 if u.stale else 0, {k: v for k, v in attrs(u).items() if k != "model_name"})
                    for u in units()]

        def age(_: CallbackOptions) -> list[Observation]:
            now = self._clock()
            return [Observation(max(0.0, now - u.last_data_t),
                                {k: v for k, v in attrs(u).items() if k != "model_name"}) for u in units()]

        def up(_: CallbackOptions) -> list[Observation]:
            return [Observation(1 if self._snapshot().up else 0)]

        meter.create_observable_gauge("vllm_otel_failure_probability", [probability],
                                      description="Probability that the failure happens within the horizon")
        meter.create_observable_gauge("vllm_otel_time_to_failure_seconds", [ttf], unit="s",
                                      description="Seconds until the failure is more likely than not")
        meter.create_observable_gauge("vllm_otel_forecast", [forecast],
                                      description="Forecast of a signal at the horizon, by quantile")
        meter.create_observable_gauge("vllm_otel_forecaster_prediction_stale", [stale],
                                      description="1: the unit's predictions are stale")
        meter.create_observable_gauge("vllm_otel_forecaster_data_age_seconds", [age], unit="s",
                                      description="Seconds since the newest sample of the unit")
        meter.create_observable_gauge("vllm_otel_forecaster_up", [up],
                                      description="1: the data source answered on the last cycle")

    def flush(self, timeout_ms: int = 10_000) -> bool:
        return bool(self.provider.force_flush(timeout_ms))

    def shutdown(self) -> None:
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001 - a collector that is down must not fail the exit
            log.debug("OTLP shutdown failed", exc_info=True)
