"""A deliberately leaking vLLM general plugin: the "leaking plugin" fault of the benchmark.

Only when ``VLLM_OTEL_BENCH_LEAK_MB_PER_S`` is set (a positive number), and only in vLLM's
API-server process (not the engine core or workers, which vLLM also runs general plugins in), a
daemon thread allocates that many MB per second, writes every page (so resident memory really
grows) and keeps the buffers forever, like a plugin caching every request. The total is capped by
``VLLM_OTEL_BENCH_LEAK_MAX_MB`` (default 4096) so a forgotten server cannot take the host down.
vLLM may call general plugins more than once per process: the thread starts once per pid.
"""

from __future__ import annotations

import os
import sys
import threading
import time

_started_pid: int | None = None
_lock = threading.Lock()
_kept: list[bytes] = []


def _role() -> str:
    try:
        import setproctitle

        title = setproctitle.getproctitle()
    except Exception:  # noqa: BLE001 - no title: assume the main (API-server) process
        title = ""
    if "EngineCore" in title:
        return "engine_core"
    if "Worker" in title:
        return "worker"
    return "api_server"


def _leak(mb_per_s: float, max_mb: float, tick_s: float = 0.1) -> None:
    chunk = int(mb_per_s * 1024 * 1024 * tick_s)
    total = 0
    next_t = time.monotonic()
    while total + chunk <= max_mb * 1024 * 1024:
        _kept.append(b"\x5a" * chunk)  # bytes(n) could stay on untouched zero pages; this writes them
        total += chunk
        next_t += tick_s
        time.sleep(max(0.0, next_t - time.monotonic()))


def register() -> None:
    global _started_pid
    try:
        rate = float(os.environ.get("VLLM_OTEL_BENCH_LEAK_MB_PER_S", "") or 0)
        max_mb = float(os.environ.get("VLLM_OTEL_BENCH_LEAK_MAX_MB", "") or 4096)
    except ValueError:
        return
    if rate <= 0 or _role() != "api_server":
        return
    with _lock:
        if _started_pid == os.getpid():
            return
        _started_pid = os.getpid()
    threading.Thread(target=_leak, args=(rate, max_mb), name="bench-leak", daemon=True).start()
    print(f"vllm_otel_bench_leak: leaking {rate:g} MB/s (at most {max_mb:g} MB) in pid {os.getpid()}",
          file=sys.stderr, flush=True)
