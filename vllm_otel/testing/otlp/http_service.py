"""OTLP/HTTP: ``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs`` on a ``ThreadingHTTPServer``.

Bodies are ``application/x-protobuf`` (or OTLP/JSON ``application/json``), optionally with
``gzip``/``deflate`` content encoding; the server speaks HTTP/1.1 keep-alive with TCP_NODELAY and
runs in a daemon thread. Error policy: an undecodable body is answered 400, an unknown content type
or encoding 415, a body over 64 MiB 413 (each counted as a bad request, nothing stored); errors carry
a ``google.rpc.Status`` body in the request's encoding. A stopping receiver drops the connection
without an answer, like a dying collector.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Iterable

import grpc
from google.protobuf import json_format

from vllm_otel.testing.otlp.faults import HTTP_TO_GRPC
from vllm_otel.testing.otlp.flatten import count_items
from vllm_otel.testing.otlp.received import ReceivedRequest
from vllm_otel.testing.otlp.wire import HTTP_PATHS, MAX_BODY, RESPONSE_TYPES, decode_body, decompress

if TYPE_CHECKING:
    from vllm_otel.testing.otlp.receiver import OtlpReceiver, RunState

__all__ = ["TrackingHTTPServer", "serve_http"]


class TrackingHTTPServer(ThreadingHTTPServer):
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



def serve_http(receiver: OtlpReceiver, run: RunState, host: str, port: int) -> int:
    """Bind ``host:port`` (0: a free port) and serve in a daemon thread; returns the bound port."""
    server = TrackingHTTPServer((host, port), _make_http_handler(receiver, run))
    run.http_server = server
    run.http_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="otlp-http", daemon=True)
    run.http_thread.start()
    return server.server_address[1]


def _make_http_handler(receiver: OtlpReceiver, run: RunState) -> type[BaseHTTPRequestHandler]:
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

            grpc_code = HTTP_TO_GRPC.get(code, grpc.StatusCode.UNKNOWN).value[0]
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
                    if total > MAX_BODY:
                        return None
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return None
            return self.rfile.read(length) if length else b""

        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] in ("/", "/health"):
                self._reply(200, b"ok", "text/plain")
            else:
                self._reply(404 if self.path.split("?", 1)[0] not in HTTP_PATHS else 405, b"", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            signal = HTTP_PATHS.get(self.path.split("?", 1)[0].rstrip("/") or "/")
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
                raw = decompress(body, encoding)
                request, wire = decode_body(signal, raw, content_type)
            except LookupError as exc:
                receiver._record_bad_request()
                self._error(415, f"unsupported content type/encoding: {exc}", as_json)
                return
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                receiver._record_bad_request()
                self._error(400, str(exc), as_json)
                return
            rec = ReceivedRequest(signal, "http", request, headers, time.time(), count_items(signal, request),
                                  encoding=wire, compression=encoding or "none")
            receiver._record_attempt(signal, "http", True, 200, headers, rec)
            response = RESPONSE_TYPES[signal]()
            if wire == "json":
                self._reply(200, json_format.MessageToJson(response).encode(), "application/json")
            else:
                self._reply(200, response.SerializeToString(), "application/x-protobuf")

    return Handler
