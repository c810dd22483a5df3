"""``HttpSupervisorBackend``: the client of ``vllm-otel supervise`` (what the receiver's
actuator uses for a target that runs under the supervisor)."""

from __future__ import annotations

from typing import Any

import httpx

from vllm_otel.httpread import ANSWER_MAX_BYTES, request_capped_sync
from vllm_otel.mitigate.supervisor.base import RestartBackend, RestartError, RestartRequest

__all__ = ["HttpSupervisorBackend"]


class HttpSupervisorBackend(RestartBackend):
    """A :class:`ProcessBackend` elsewhere, through its HTTP API (what the actuator calls)."""

    kind = "http"

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 900.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._transport = transport

    def _call(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            with httpx.Client(timeout=timeout_s or self.timeout_s, transport=self._transport) as c:
                r = request_capped_sync(c, method, self.url + path, max_bytes=ANSWER_MAX_BYTES, json=body,
                                        headers=self._headers)
        except httpx.HTTPError as e:
            raise RestartError(f"supervisor {self.url} unreachable: {type(e).__name__}: {e}", 502) from None
        try:
            payload = r.json()
        except ValueError:
            payload = {"error": r.text[:500]}
        if r.status_code != 200:
            raise RestartError(f"supervisor answered HTTP {r.status_code}: "
                               f"{payload.get('error', payload) if isinstance(payload, dict) else payload}",
                               r.status_code, payload.get("data") if isinstance(payload, dict) else None)
        return payload

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status", timeout_s=min(30.0, self.timeout_s))

    def restart(self, req: RestartRequest, timeout_s: float | None = None) -> dict[str, Any]:
        return self._call("POST", "/restart", req.model_dump(mode="json"), timeout_s=timeout_s)
