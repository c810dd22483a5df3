"""``GET /healthz`` (store and worker; 503 when either is down) and ``GET /metrics``
(Prometheus exposition). Neither needs a credential: probes and Prometheus read them."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from vllm_otel.mitigate.routes.common import json_answer, receiver_of

__all__ = ["healthz", "metrics"]


async def metrics(request: Request) -> Response:
    data = await asyncio.to_thread(generate_latest, receiver_of(request).metrics.registry)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    receiver = receiver_of(request)
    out: dict[str, Any] = {"status": "ok", "replica": receiver.replica_id}
    code = 200
    try:
        await asyncio.to_thread(receiver.store.ping)
        out["store"] = "ok"
    except Exception as e:  # noqa: BLE001 - any store failure is "degraded", said in the answer
        out["store"], out["status"], code = f"error: {type(e).__name__}", "degraded", 503
    out["worker"] = receiver.worker.status()
    if out["worker"] == "stopped":
        out["status"], code = "degraded", 503
    return json_answer(code, out)
