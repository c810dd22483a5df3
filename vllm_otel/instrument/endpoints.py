"""The ``vllm.endpoint_plugins`` entry point: ``/monitoring/*`` routes and request context.

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``VLLM_PLUGINS=vllm_otel``),
because they widen the server's network surface. Ours adds read-only JSON routes:
- ``GET /monitoring/status``: lifecycle state, active requests, stalls, OTLP export health,
  recent predictions and mitigations (filled by the services as they land);
- ``GET /monitoring/lifecycle``: the lifecycle history and checkpoints (secrets redacted);
and the ASGI middleware that hands each request's ``traceparent`` and operation to the stat
logger (see :mod:`vllm_otel.instrument.requests`).
"""

from __future__ import annotations

import os
import time
from argparse import Namespace
from typing import Any

from vllm_otel.instrument.guard import guarded, logger

__all__ = ["MonitoringEndpoints", "register_endpoints"]


class MonitoringEndpoints:
    """Satisfies vLLM's ``EndpointPlugin`` protocol (name, required_tasks, attach_router, init_state)."""

    name = "vllm_otel"
    required_tasks = None  # useful on every server, whatever task it serves

    def __init__(self) -> None:
        self._started = time.time()
        self._engine_client: Any = None

    @guarded("endpoints.attach_router")
    def attach_router(self, app: Any) -> None:
        from fastapi.responses import JSONResponse

        from vllm_otel import __version__
        from vllm_otel.instrument.requests import RequestContextMiddleware

        app.add_middleware(RequestContextMiddleware)

        def _monitor() -> Any:
            from vllm_otel.instrument.monitor import get_monitor

            return get_monitor()

        async def status() -> JSONResponse:
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
            return JSONResponse(body)

        async def lifecycle() -> JSONResponse:
            mon = _monitor()
            if mon is None:
                return JSONResponse({"error": "monitoring disabled"}, status_code=503)
            try:
                return JSONResponse({"engines": mon.get_lifecycle()})
            except Exception as e:  # noqa: BLE001
                logger.warning("vllm-otel: /monitoring/lifecycle failed: %s", e)
                return JSONResponse({"error": "lifecycle unavailable, see server log"}, status_code=500)

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
            try:
                raw = await request.body()
                params = (await request.json()) if raw.strip() else {}
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
                return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)
            return JSONResponse(out)

        # Real classes, not the strings `from __future__ import annotations` leaves: FastAPI
        # resolves string annotations in module globals, where these lazy imports are not.
        control.__annotations__ = {"action": str, "request": Request, "return": JSONResponse}
        app.add_api_route("/monitoring/control/{action}", control, methods=["POST"], tags=["vllm-otel"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self._engine_client = engine_client


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
