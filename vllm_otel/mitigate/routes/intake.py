"""``POST /webhook``: Alertmanager's notifications in, stored before the 202.

Only 5xx answers make Alertmanager retry, so: 400 for payloads that will never be valid, 401/403
for auth, 413 for oversize bodies, 503 when the store is down (retry is right then). The route is
also served by :func:`webhook_asgi` straight from the app's ``__call__`` (the hot path skips the
router), so :func:`webhook` answers every outcome itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vllm_otel.mitigate.records import AlertmanagerWebhook, describe_validation_error
from vllm_otel.mitigate.routes.common import json_answer, read_body, receiver_of
from vllm_otel.mitigate.serve_auth import bearer

__all__ = ["webhook", "webhook_asgi", "parse_webhook", "INLINE_MAX_BODY_BYTES"]

# The receiver's own logger: operators filter the intake's failures under that name.
log = logging.getLogger("vllm_otel.mitigate.receiver")

# Webhook bodies above this are parsed and validated on a worker thread and stored by the
# group-commit writer, never inline on the event loop: a small one is cheaper inline (one commit,
# no hand-over), a large one would hold the loop, and every other webhook, for its parse.
INLINE_MAX_BODY_BYTES = 32 * 1024


def parse_webhook(body: bytes) -> AlertmanagerWebhook | str:
    """The notification, or why the body is not one (the 400 answer's detail)."""
    try:
        data = json.loads(body)
    except ValueError as e:
        return f"body is not valid JSON: {e}"
    try:
        return AlertmanagerWebhook.model_validate(data)
    except ValidationError as e:
        return "not an Alertmanager webhook (version 4): " + describe_validation_error(e)


def intake_denied(request: Request) -> JSONResponse | None:
    """The intake token's check (an operator's credential is not one); None admits."""
    creds = receiver_of(request).credentials
    if creds.intake is None:
        return None
    cred, problem = bearer(request.headers.get("authorization"))
    if cred is None:
        return json_answer(401, {"detail": problem}, {"WWW-Authenticate": "Bearer"})
    if not creds.is_intake(cred):
        return json_answer(403, {"detail": "wrong bearer token"})
    return None


async def webhook(request: Request) -> Response:
    receiver = receiver_of(request)
    gate = receiver.intake_gate
    gate.enter()
    t0 = time.perf_counter()
    try:
        resp = await _store_notification(request)
    finally:
        gate.leave()
    receiver.metrics.webhook_seconds.observe(time.perf_counter() - t0)
    receiver.metrics.webhooks.labels(str(resp.status_code)).inc()
    return resp


async def webhook_asgi(scope: Any, receive: Any, send: Any) -> None:
    """The webhook as a bare ASGI app (``scope["app"]`` must be the receiver's app)."""
    response = await webhook(Request(scope, receive))
    await response(scope, receive, send)


async def _store_notification(request: Request) -> Response:
    denied = intake_denied(request)
    if denied is not None:
        return denied
    body = await read_body(request)
    if isinstance(body, Response):
        return body
    receiver = receiver_of(request)
    large = len(body) > INLINE_MAX_BODY_BYTES
    hook = await asyncio.to_thread(parse_webhook, body) if large else parse_webhook(body)
    if isinstance(hook, str):
        return json_answer(400, {"detail": hook})
    try:
        # Returns once the transaction holding this notification committed (group commit).
        counts = await receiver.intake.submit(hook, inline_ok=not large)
    except Exception as e:  # noqa: BLE001 - 503 makes Alertmanager retry; nothing was lost
        log.exception("could not persist notification")
        receiver.metrics.store_errors.inc()
        return json_answer(503, {"detail": f"store unavailable: {type(e).__name__}"})
    return json_answer(202, {"status": "accepted", **counts})
