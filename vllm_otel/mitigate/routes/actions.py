"""``POST /actions/{id}/approve`` and ``/reject``: an operator decides on an action that waits
for approval. Who decided is the operator whose credential came with the request."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from vllm_otel.mitigate.routes.common import acting_operator, json_answer, operator_body, receiver_of

__all__ = ["ApproveBody", "approve", "reject"]


# No ``by`` field: who acted is the operator whose credential came with the request (a ``by``
# that older clients still send is ignored).
class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    comment: str = Field("", max_length=2000)


async def approve(request: Request) -> Response:
    return await _decide(request, approved=True)


async def reject(request: Request) -> Response:
    return await _decide(request, approved=False)


async def _decide(request: Request, *, approved: bool) -> Response:
    action_id: int = request.path_params["action_id"]
    who, denied = acting_operator(request)
    if denied is not None or who is None:
        return denied  # type: ignore[return-value]
    body = await operator_body(request, ApproveBody)
    if isinstance(body, Response):
        return body
    receiver = receiver_of(request)
    decide = receiver.approve if approved else receiver.reject
    code, out = await asyncio.to_thread(decide, action_id, who, body.comment)
    return json_answer(code, out)
