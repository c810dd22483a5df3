"""The least a webhook receiver can do, for comparison: an ASGI app under the same uvicorn that
reads the body and answers 202 (no auth, no validation, no database). What it costs at a given
rate on this host is the floor under ``vllm-otel receiver``'s latency.

    python -m uvicorn benchmarks.bare_app:app --port 9999
"""

from __future__ import annotations

from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # the whole body, as a receiver must
        msg = await receive()
        more = msg.get("more_body", False)
    code = 202 if scope["method"] == "POST" else 200
    body = b'{"status":"accepted"}' if code == 202 else b"ok"
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
