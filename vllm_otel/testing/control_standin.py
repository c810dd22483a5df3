"""Many vLLM targets behind one port: ``/metrics`` and ``/monitoring/control/<verb>`` per target.

A stand-in, not vLLM: the receiver's storm benchmark (benchmarks/receiver_storm.py) and its
correctness test need hundreds of targets the mitigation actions can really reach over HTTP, and
hundreds of vLLM servers do not fit on a test host. Target ``i`` lives under ``/t<i>``; its
``url`` in a policy is ``http://127.0.0.1:<port>/t<i>``. It answers as vLLM with the vllm-otel
plugin does (instrument/control.py): a bearer token, ``set_queue_limits`` answering
``{"before": ..., "after": ...}``, 400 for unknown parameters, 404 for unknown verbs, and a
``/metrics`` page with the series the strategies read. Every target starts under pressure (100
requests in flight, KV cache 95 % full); once a request cap is set, the requests in flight drop
to it (with a token cap, the queue shrinks to 10), so a verified action sees its effect. ``POST /escalate`` stands for a pager hook. Every
control call and escalation is counted (``GET /calls``), so a test can prove which actions
reached which target.
"""

from __future__ import annotations

import argparse
import hmac
import threading
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

__all__ = ["make_app", "ControlStandin"]

_LIMITS = ("max_num_queued_reqs", "max_num_queued_tokens")
_KV_SIZE_TOKENS = 65536


class _Target:
    def __init__(self) -> None:
        self.limits: dict[str, int | None] = {n: None for n in _LIMITS}
        self.running, self.waiting, self.kv = 10, 90, 0.95

    def metrics(self) -> str:
        cap = self.limits["max_num_queued_reqs"]
        waiting = self.waiting if cap is None else max(0, min(self.waiting, cap - self.running))
        if self.limits["max_num_queued_tokens"] is not None:  # long prompts pushed back
            waiting = min(waiting, 10)
        lb = 'model_name="standin"'
        return (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{lb}}} {self.running}\n"
                f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{lb}}} {waiting}\n"
                f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{{lb}}} {self.kv}\n"
                f"# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{{lb},block_size=\"16\","
                f"num_gpu_blocks=\"{_KV_SIZE_TOKENS // 16}\",kv_cache_size_tokens=\"{_KV_SIZE_TOKENS}\"}} 1.0\n")


def make_app(n_targets: int, token: str) -> Starlette:
    targets = [_Target() for _ in range(n_targets)]
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def target(request: Request) -> _Target | None:
        try:
            i = int(request.path_params["t"])
        except ValueError:
            return None
        return targets[i] if 0 <= i < n_targets else None

    async def metrics(request: Request) -> PlainTextResponse:
        t = target(request)
        if t is None:
            return PlainTextResponse("no such target\n", status_code=404)
        return PlainTextResponse(t.metrics(), media_type="text/plain; version=0.0.4")

    async def control(request: Request) -> JSONResponse:
        t = target(request)
        if t is None:
            return JSONResponse({"error": "no such target"}, status_code=404)
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"error": "bad or missing control token"}, status_code=401)
        verb = request.path_params["verb"]
        if verb == "status":
            return JSONResponse({"limits": dict(t.limits)})
        if verb != "set_queue_limits":
            return JSONResponse({"error": f"unknown action {verb!r}"}, status_code=404)
        try:
            body: dict[str, Any] = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        unknown = sorted(set(body) - set(_LIMITS))
        if unknown:
            return JSONResponse({"error": f"bad parameters for set_queue_limits: unknown "
                                          f"{', '.join(unknown)}"}, status_code=400)
        with lock:
            before = dict(t.limits)
            t.limits.update({k: None if v is None else int(v) for k, v in body.items()})
            calls[f"t{request.path_params['t']}/{verb}"] += 1
        return JSONResponse({"before": before, "after": dict(t.limits)})

    async def escalate(request: Request) -> JSONResponse:
        # A pager / chat hook: the escalation strategy posts here (bearer token optional).
        try:
            await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        with lock:
            calls["escalate"] += 1
        return JSONResponse({"ok": True})

    async def list_calls(request: Request) -> JSONResponse:
        with lock:
            return JSONResponse(dict(calls))

    return Starlette(routes=[
        Route("/t{t}/metrics", metrics), Route("/t{t}/monitoring/control/{verb}", control, methods=["POST"]),
        Route("/escalate", escalate, methods=["POST"]), Route("/calls", list_calls)])


class ControlStandin:
    """The stand-in on a uvicorn server in a thread of this process (tests); ``url(i)`` is target
    ``i``'s base URL. The benchmark runs it as its own process instead (``python -m``)."""

    def __init__(self, n_targets: int, token: str, port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(make_app(n_targets, token), host="127.0.0.1",
                                                    port=port, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self.server.run, name="control-standin", daemon=True)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port}/t{i}"

    def calls(self) -> dict[str, int]:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/calls", timeout=10).json()

    def __enter__(self) -> "ControlStandin":
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the control stand-in did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self._thread.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-file", required=True)
    args = ap.parse_args()
    import uvicorn

    with open(args.token_file) as f:
        token = f.read().strip()
    uvicorn.run(make_app(args.targets, token), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
