"""``GET`` and ``POST /killswitch``: read it, or (an operator, by name) engage or release it."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from vllm_otel.mitigate.routes.common import acting_operator, json_answer, operator, operator_body, receiver_of

__all__ = ["KillSwitchBody", "get_kill_switch", "set_kill_switch"]


class KillSwitchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    engaged: bool
    reason: str = Field("", max_length=2000)


async def get_kill_switch(request: Request) -> Response:
    _, denied = operator(request)
    if denied is not None:
        return denied
    return json_answer(200, await asyncio.to_thread(receiver_of(request).kill_switch_state))


async def set_kill_switch(request: Request) -> Response:
    who, denied = acting_operator(request)
    if denied is not None or who is None:
        return denied  # type: ignore[return-value]
    body = await operator_body(request, KillSwitchBody)
    if isinstance(body, Response):
        return body
    receiver = receiver_of(request)
    return json_answer(200, await asyncio.to_thread(receiver.set_kill_switch, body.engaged, who, body.reason))
