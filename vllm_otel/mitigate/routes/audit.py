"""Operators' reads: the audit trail (``GET /actions``, ``GET /actions/{id}``) and what the
learner has learnt (``GET /learner``). Database reads run off the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from vllm_otel.learn import describe_learner
from vllm_otel.mitigate.routes.common import json_answer, operator, receiver_of

__all__ = ["list_actions", "get_action", "learner"]


async def list_actions(request: Request) -> Response:
    _, denied = operator(request)
    if denied is not None:
        return denied
    q = request.query_params
    try:
        limit, offset = int(q.get("limit", 100)), int(q.get("offset", 0))
    except ValueError:
        return json_answer(400, {"detail": "limit and offset must be integers"})
    limit = max(1, min(limit, 1000))
    rows = await asyncio.to_thread(receiver_of(request).store.actions, limit=limit, offset=max(0, offset),
                                   alertname=q.get("alertname"), fingerprint=q.get("fingerprint"),
                                   strategy=q.get("strategy"), outcome=q.get("outcome"))
    return json_answer(200, {"actions": [r.to_json() for r in rows], "count": len(rows)})


async def get_action(request: Request) -> Response:
    action_id: int = request.path_params["action_id"]
    _, denied = operator(request)
    if denied is not None:
        return denied
    row = await asyncio.to_thread(receiver_of(request).store.action, action_id)
    if row is None:
        return json_answer(404, {"detail": f"no action {action_id}"})
    return json_answer(200, row.to_json())


async def learner(request: Request) -> Response:
    """What the learner has learnt (per situation and strategy) and the rules mined from it."""
    _, denied = operator(request)
    if denied is not None:
        return denied
    receiver = receiver_of(request)
    await asyncio.to_thread(receiver.sync_learner)

    def describe() -> dict[str, Any]:
        with receiver.worker._learner_mutex:
            return describe_learner(receiver.learner)

    return json_answer(200, await asyncio.to_thread(describe))
