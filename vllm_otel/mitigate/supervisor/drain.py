"""Draining a vLLM before a restart, through its control endpoint (queue limit 0, then wait
until nothing is in flight). Best effort: it never raises for vLLM's sake."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from vllm_otel.httpread import ANSWER_MAX_BYTES, request_capped_sync

__all__ = ["drain_vllm", "read_token"]


def drain_vllm(base_url: str, token: str | None, timeout_s: float, *, poll_s: float = 0.5,
               client: httpx.Client | None = None) -> dict[str, Any]:
    """Stop admitting (queue limit 0: new requests get 503) and wait until nothing is in flight.

    Needs vLLM's control endpoint (``VLLM_OTEL_CONTROL_TOKEN_FILE``); without it the answer says
    why and the caller restarts undrained. Never raises for vLLM's sake: a drain is best effort.
    """
    t0 = time.monotonic()
    if not token:
        return {"drained": False, "detail": "no control token: vLLM's control endpoint is off", "seconds": 0.0}
    own = client is None
    c = client or httpx.Client(timeout=10.0)
    headers = {"Authorization": f"Bearer {token}"}
    url = base_url.rstrip("/") + "/monitoring/control/"
    in_flight = None
    try:
        r = request_capped_sync(c, "POST", url + "set_queue_limits", max_bytes=ANSWER_MAX_BYTES,
                                json={"max_num_queued_reqs": 0}, headers=headers)
        if r.status_code != 200:
            return {"drained": False, "detail": f"set_queue_limits: HTTP {r.status_code}",
                    "seconds": time.monotonic() - t0}
        while True:
            st = request_capped_sync(c, "POST", url + "status", max_bytes=ANSWER_MAX_BYTES, json={},
                                     headers=headers)
            if st.status_code == 200:
                in_flight = (st.json().get("result") or {}).get("unfinished_requests")
                if in_flight == 0:
                    return {"drained": True, "detail": "nothing in flight", "in_flight": 0,
                            "seconds": time.monotonic() - t0}
            if time.monotonic() - t0 >= timeout_s:
                return {"drained": False, "detail": f"drain timeout ({timeout_s:.0f} s)",
                        "in_flight": in_flight, "seconds": time.monotonic() - t0}
            time.sleep(poll_s)
    except (httpx.HTTPError, ValueError) as e:
        return {"drained": False, "detail": f"control endpoint unreachable: {type(e).__name__}",
                "in_flight": in_flight, "seconds": time.monotonic() - t0}
    finally:
        if own:
            c.close()


def read_token(path: str | os.PathLike[str] | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None
