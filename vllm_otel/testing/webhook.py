"""A minimal real HTTP endpoint that records what Alertmanager posts to it.

Tests of the foundation use it to see notifications arrive; the mitigation receiver replaces it
in the closed loop. It is a plain HTTP server on loopback, not a stand-in for Alertmanager.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["WebhookSink"]


class WebhookSink:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, path: str = "/webhook") -> None:
        self.received: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    payload = json.loads(raw)
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                with sink._cond:
                    sink.received.append({"path": self.path, "headers": dict(self.headers),
                                          "payload": payload, "t": time.time()})
                    sink._cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "WebhookSink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0) -> dict[str, Any]:
        """Block until a posted payload satisfies ``predicate``; return that payload."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for item in self.received:
                    if predicate(item["payload"]):
                        return item["payload"]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching webhook in {timeout_s:.0f} s; got {len(self.received)}")
                self._cond.wait(left)

    def __enter__(self) -> "WebhookSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
