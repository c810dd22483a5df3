"""The ``vllm.endpoint_plugins`` entry point: HTTP routes under ``/monitoring`` on vLLM's server.

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (``VLLM_PLUGINS=vllm_otel``),
because they widen the server's network surface. Foundation stage: ``GET /monitoring/status``
answers with what this process knows; the telemetry issue adds lifecycle state and history.
"""

from __future__ import annotations

import os
import time
from argparse import Namespace
from typing import Any

__all__ = ["MonitoringEndpoints", "register_endpoints"]


class MonitoringEndpoints:
    """Satisfies vLLM's ``EndpointPlugin`` protocol (name, required_tasks, attach_router, init_state)."""

    name = "vllm_otel"
    required_tasks = None  # useful on every server, whatever task it serves

    def __init__(self) -> None:
        self._started = time.time()
        self._engine_client: Any = None

    def attach_router(self, app: Any) -> None:
        from fastapi.responses import JSONResponse

        from vllm_otel import __version__

        async def status() -> JSONResponse:
            # Route handlers must not fail the request path with a 500 from our bugs: answer
            # what we can.
            body: dict[str, Any] = {"vllm_otel_version": __version__, "pid": os.getpid(),
                                    "uptime_s": round(time.time() - self._started, 3),
                                    "engine_attached": self._engine_client is not None}
            return JSONResponse(body)

        app.add_api_route("/monitoring/status", status, methods=["GET"], include_in_schema=True,
                          tags=["vllm-otel"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self._engine_client = engine_client


def register_endpoints() -> MonitoringEndpoints:
    """Factory vLLM calls (zero arguments) to get the plugin object."""
    return MonitoringEndpoints()
