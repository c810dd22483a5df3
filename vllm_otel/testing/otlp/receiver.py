"""The receiver: one object that owns its gRPC and HTTP servers, what they received, and the faults.

:meth:`OtlpReceiver.stop` then :meth:`~OtlpReceiver.start` again -- the receiver goes down
(connection refused, open keep-alive connections are cut) and comes back on the *same* ports;
a new ``OtlpReceiver(grpc_port=..., http_port=...)`` on the old ports works as well. A port that
cannot be bound raises ``OSError`` from :meth:`~OtlpReceiver.start`, with nothing left serving.

No global state: every receiver owns its servers, threads, locks and data.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from vllm_otel.testing.otlp.faults import FaultInjection
from vllm_otel.testing.otlp.grpc_service import serve_grpc
from vllm_otel.testing.otlp.http_service import TrackingHTTPServer, serve_http
from vllm_otel.testing.otlp.received import ReceivedExports
from vllm_otel.testing.otlp.wire import SIGNALS

__all__ = ["OtlpReceiver", "RunState"]


class RunState:
    """Per start()/stop() cycle, so that handlers of an old run never see a new run's state."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.grpc_server: grpc.Server | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.http_server: TrackingHTTPServer | None = None
        self.http_thread: threading.Thread | None = None


class OtlpReceiver(ReceivedExports, FaultInjection):
    """OTLP/gRPC + OTLP/HTTP receiver on loopback that records what exporters send.

    ``grpc_port``/``http_port`` 0 pick free ports on the first :meth:`start`; later starts reuse
    the same ports. Pass ``grpc_port=None`` or ``http_port=None`` to not serve that transport.
    Queries and waits come from :class:`ReceivedExports`, failure injection from
    :class:`FaultInjection`.
    """

    def __init__(self, host: str = "127.0.0.1", grpc_port: int | None = 0, http_port: int | None = 0,
                 max_items: int = 100_000, grpc_workers: int = 16) -> None:
        ReceivedExports.__init__(self, max_items)
        FaultInjection.__init__(self)
        self.host = host
        self._grpc_port = grpc_port
        self._http_port = http_port
        self._grpc_workers = grpc_workers
        self._run: RunState | None = None
        self._life_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> "OtlpReceiver":
        """Bind and serve. Idempotent; after :meth:`stop` it comes back on the same ports."""
        with self._life_lock:
            if self._run is not None:
                return self
            run = RunState()
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

    def _start_grpc(self, run: RunState, port: int) -> int:
        return serve_grpc(self, run, self.host, port, self._grpc_workers)

    def _start_http(self, run: RunState, port: int) -> int:
        return serve_http(self, run, self.host, port)

    @staticmethod
    def _teardown(run: RunState, grace_s: float = 0.0) -> None:
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

    def _state_note(self) -> str:
        return f", running: {self._run is not None}"

    def __repr__(self) -> str:
        return (f"OtlpReceiver(host={self.host!r}, grpc_port={self._grpc_port}, http_port={self._http_port}, "
                f"running={self.running})")
