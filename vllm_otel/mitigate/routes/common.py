"""What the receiver's handlers share: the receiver behind a request, JSON answers, capped body
reads and the operator check.

Auth answers: 401 without a bearer credential, 403 with one that does not admit the route (the
intake token is never an operator's). Body reads stop at their limit (413) whether or not the
client declared a length.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vllm_otel.mitigate.records import describe_validation_error
from vllm_otel.mitigate.serve_auth import Credentials, bearer

if TYPE_CHECKING:
    from vllm_otel.mitigate.receiver import Receiver

__all__ = ["receiver_of", "json_answer", "read_body", "operator", "acting_operator", "operator_body",
           "OPERATOR_MAX_BODY_BYTES"]

OPERATOR_MAX_BODY_BYTES = 64 * 1024
_B = TypeVar("_B", bound=BaseModel)


def receiver_of(request: Request) -> "Receiver":
    """The :class:`Receiver` this app serves (``create_app`` puts it in ``app.state``)."""
    return request.app.state.receiver


def json_answer(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(dict(body), status_code=status, headers=dict(headers or {}))


async def read_body(request: Request, limit: int | None = None) -> bytes | JSONResponse:
    """The body, or the 413/400 answer; ``limit`` defaults to the receiver's webhook limit."""
    limit = receiver_of(request).max_body_bytes if limit is None else limit
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return json_answer(413, {"detail": f"body larger than {limit} bytes"})
        except ValueError:
            return json_answer(400, {"detail": "bad Content-Length"})
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no Content-Length to trust
        size += len(chunk)
        if size > limit:
            return json_answer(413, {"detail": f"body larger than {limit} bytes"})
        chunks.append(chunk)
    return b"".join(chunks)


def operator(request: Request) -> tuple[str | None, JSONResponse | None]:
    """The operator behind an API request, or the answer that refuses it."""
    creds = receiver_of(request).credentials
    if creds.open:
        return Credentials.UNAUTHENTICATED, None
    cred, problem = bearer(request.headers.get("authorization"))
    if cred is None:
        return None, json_answer(401, {"detail": problem}, {"WWW-Authenticate": "Bearer"})
    name = creds.operator_for(cred)
    if name is not None:
        return name, None
    if not creds.operators:
        return None, json_answer(403, {"detail": "no operator credentials are configured "
                                                 "(vllm-otel receiver --operator NAME=FILE)"})
    if creds.is_intake(cred):
        return None, json_answer(403, {"detail": "the intake token only delivers webhooks; this "
                                                 "needs an operator credential"})
    return None, json_answer(403, {"detail": "wrong bearer token"})


def acting_operator(request: Request) -> tuple[str | None, JSONResponse | None]:
    """As :func:`operator`, for routes that change something: a name, or the refusal."""
    who, denied = operator(request)
    if denied is not None or who is None:
        return None, denied or json_answer(403, {"detail": "operator credential required"})
    return who, None


async def operator_body(request: Request, model: type[_B]) -> _B | JSONResponse:
    """An operator's JSON body as ``model``, or the 400/413/415 answer."""
    if receiver_of(request).credentials.open and "json" not in request.headers.get("content-type", ""):
        # No credentials to check: at least a page on another site cannot post here (a
        # cross-site form can send text/plain, never application/json without CORS).
        return json_answer(415, {"detail": "send the body as application/json"})
    body = await read_body(request, OPERATOR_MAX_BODY_BYTES)
    if isinstance(body, Response):
        return body  # type: ignore[return-value]
    try:
        return model.model_validate(json.loads(body) if body.strip() else {})
    except ValueError as e:
        msg = describe_validation_error(e) if isinstance(e, ValidationError) else str(e)
        return json_answer(400, {"detail": f"bad body: {msg}"})
