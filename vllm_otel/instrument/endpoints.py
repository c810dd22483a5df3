"""The ``vllm.endpoint_plugins`` entry point: ``/monitoring/*`` routes and request context.

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``VLLM_PLUGINS=vllm_otel``),
because they widen the server's network surface. Ours adds read-only JSON routes:
- ``GET /monitoring/status``: lifecycle state, active requests, stalls, OTLP export health,
  recent predictions and mitigations (filled by the services as they land);
- ``GET /monitoring/lifecycle``: the lifecycle history and checkpoints (secrets redacted);
and the ASGI middleware that hands each request's ``traceparent`` and operation to the stat
logger (see :mod:`vllm_otel.instrument.requests`).

Who may read them: when vLLM has an API key (``--api-key``, ``VLLM_API_KEY``) or our control token
is set, the monitoring routes want one of them as a bearer token (vLLM's own key check covers
only /v1 and a few other prefixes, not ours). Without any key they stay open, but then show no
command line and no environment: anyone who reaches the port would read them.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from argparse import Namespace
from typing import Any, Sequence

from vllm_otel.instrument.guard import guarded, logger
from vllm_otel.redact import redact_text

__all__ = ["MonitoringEndpoints", "register_endpoints", "CONTROL_MAX_BODY_BYTES"]

# A control request is a few parameters; anything bigger is refused before it is read whole.
CONTROL_MAX_BODY_BYTES = 16 * 1024
# Keys of a lifecycle checkpoint that describe the process's launch: shown only to key holders.
_LAUNCH_KEYS = frozenset({"arguments", "environment", "argv", "env", "cmdline"})


def _without_launch(obj: Any) -> Any:
    """``obj`` without command line and environment, at any depth."""
    if isinstance(obj, dict):
        return {k: _without_launch(v) for k, v in obj.items() if k not in _LAUNCH_KEYS}
    if isinstance(obj, list):
        return [_without_launch(v) for v in obj]
    return obj


def _api_keys(app: Any) -> list[str]:
    """vLLM's API keys as vLLM itself picks them: ``--api-key`` (one or more), else VLLM_API_KEY."""
    args = getattr(getattr(app, "state", None), "args", None)
    keys = getattr(args, "api_key", None)
    if isinstance(keys, str):
        keys = [keys]
    return [k for k in (keys or [os.environ.get("VLLM_API_KEY")]) if k]


def _bearer_matches(header: str, secrets: Sequence[str]) -> bool:
    scheme, _, cred = header.partition(" ")
    if scheme.lower() != "bearer" or not cred.strip():
        return False
    got = cred.strip().encode()
    ok = False
    for s in secrets:  # every one compared: no early exit
        ok = hmac.compare_digest(got, s.encode()) or ok
    return ok


class MonitoringEndpoints:
    """Satisfies vLLM's ``EndpointPlugin`` protocol (name, required_tasks, attach_router, init_state)."""

    name = "vllm_otel"
    required_tasks = None  # useful on every server, whatever task it serves

    def __init__(self) -> None:
        self._started = time.time()
        self._engine_client: Any = None

    @guarded("endpoints.attach_router")
    def attach_router(self, app: Any) -> None:
        from fastapi import Request
        from fastapi.responses import JSONResponse

        from vllm_otel import __version__
        from vllm_otel.instrument.requests import RequestContextMiddleware

        app.add_middleware(RequestContextMiddleware)
        control_token = _control_token()
        readers = _api_keys(app) + ([control_token] if control_token else [])

        def denied(request: Any) -> JSONResponse | None:
            if not readers:
                return None
            header = request.headers.get("authorization", "")
            if not header:
                return JSONResponse({"error": "bearer token required (vLLM's API key or the "
                                              "vllm-otel control token)"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            if not _bearer_matches(header, readers):
                return JSONResponse({"error": "wrong token"}, status_code=403)
            return None

        def _monitor() -> Any:
            from vllm_otel.instrument.monitor import get_monitor

            return get_monitor()

        async def status(request: Request) -> JSONResponse:
            no = denied(request)
            if no is not None:
                return no
            body: dict[str, Any] = {"vllm_otel_version": __version__, "pid": os.getpid(),
                                    "engine_attached": self._engine_client is not None}
            try:
                mon = _monitor()
                if mon is not None:
                    body.update(mon.get_engine_status())
                else:
                    body["note"] = "monitoring disabled or stat logger not loaded (async serving only)"
            except Exception as e:  # noqa: BLE001 - answer what we can
                logger.warning("vllm-otel: /monitoring/status failed: %s", e)
                body["error"] = "status unavailable, see server log"
            return JSONResponse(body if readers else _without_launch(body))

        async def lifecycle(request: Request) -> JSONResponse:
            no = denied(request)
            if no is not None:
                return no
            mon = _monitor()
            if mon is None:
                return JSONResponse({"error": "monitoring disabled"}, status_code=503)
            try:
                engines = mon.get_lifecycle()
                return JSONResponse({"engines": engines if readers else _without_launch(engines)})
            except Exception as e:  # noqa: BLE001
                logger.warning("vllm-otel: /monitoring/lifecycle failed: %s", e)
                return JSONResponse({"error": "lifecycle unavailable, see server log"}, status_code=500)

        # Real classes, not the strings `from __future__ import annotations` leaves (see below).
        status.__annotations__ = {"request": Request, "return": JSONResponse}
        lifecycle.__annotations__ = {"request": Request, "return": JSONResponse}
        app.add_api_route("/monitoring/status", status, methods=["GET"], tags=["vllm-otel"])
        app.add_api_route("/monitoring/lifecycle", lifecycle, methods=["GET"], tags=["vllm-otel"])
        self._attach_control(app)

    def _attach_control(self, app: Any) -> None:
        """``POST /monitoring/control/{action}``: live actions for the mitigation receiver.

        Off unless a token is configured (``VLLM_OTEL_CONTROL_TOKEN_FILE``, or
        ``VLLM_OTEL_CONTROL_TOKEN``): acting on the engine is never exposed by accident.
        """
        import hmac

        from fastapi import Request
        from fastapi.responses import JSONResponse

        from vllm_otel.instrument.control import ControlError, ControlPlane

        token = _control_token()

        async def control(action: str, request: Request) -> JSONResponse:
            if token is None:
                return JSONResponse({"error": "control endpoints disabled: set VLLM_OTEL_CONTROL_TOKEN_FILE"},
                                    status_code=404)
            auth = request.headers.get("authorization", "")
            if not auth.lower().startswith("bearer "):
                return JSONResponse({"error": "bearer token required"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
                return JSONResponse({"error": "wrong token"}, status_code=403)
            if self._engine_client is None:
                return JSONResponse({"error": "no engine attached"}, status_code=409)
            raw = await _read_capped(request, CONTROL_MAX_BODY_BYTES)
            if raw is None:
                return JSONResponse({"error": f"body larger than {CONTROL_MAX_BODY_BYTES} bytes"},
                                    status_code=413)
            try:
                params = json.loads(raw) if raw.strip() else {}
            except ValueError:
                return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
            if not isinstance(params, dict):
                return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
            try:
                out = await ControlPlane(self._engine_client).execute(action, params)
            except ControlError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except Exception as e:  # noqa: BLE001 - report, never crash the server
                logger.warning("vllm-otel control %s failed", action, exc_info=True)
                return JSONResponse({"error": f"internal error in {action}: {type(e).__name__}: "
                                              f"{redact_text(e)}"}, status_code=500)
            return JSONResponse(out)

        # Real classes, not the strings `from __future__ import annotations` leaves: FastAPI
        # resolves string annotations in module globals, where these lazy imports are not.
        control.__annotations__ = {"action": str, "request": Request, "return": JSONResponse}
        app.add_api_route("/monitoring/control/{action}", control, methods=["POST"], tags=["vllm-otel"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self._engine_client = engine_client


async def _read_capped(request: Any, limit: int) -> bytes | None:
    """The request body, or None once it passes ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _control_token() -> str | None:
    path = os.environ.get("VLLM_OTEL_CONTROL_TOKEN_FILE")
    if path:
        try:
            tok = open(path).read().strip()  # noqa: SIM115
            return tok or None
        except OSError:
            logger.warning("vllm-otel: cannot read VLLM_OTEL_CONTROL_TOKEN_FILE; control endpoints disabled")
            return None
    return os.environ.get("VLLM_OTEL_CONTROL_TOKEN") or None


def register_endpoints() -> MonitoringEndpoints:
    """Factory vLLM calls (zero arguments) to get the plugin object."""
    return MonitoringEndpoints()
