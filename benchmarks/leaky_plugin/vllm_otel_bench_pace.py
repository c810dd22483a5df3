"""Benchmark-only vLLM plugin: give the engine GPU-like step times on a CPU with a tiny model.

A real model on a GPU spends a roughly fixed time per engine step (reading the weights) plus a
little per scheduled token (prefill), so a request lasts seconds and the number in flight grows
in proportion to the load. The tiny CPU model finishes a step in a millisecond or two at low
batch and slows down steeply with batch size, which makes requests last a fraction of a second
and turns every overload into a jump from almost idle to saturated between two scrapes.

With ``VLLM_OTEL_BENCH_STEP_MS`` set, and only in the engine-core process (where vLLM's
scheduler runs), each scheduling step that runs the model is padded with a sleep of
``VLLM_OTEL_BENCH_STEP_MS`` ms plus ``VLLM_OTEL_BENCH_STEP_US_PER_TOKEN`` microseconds (default
50) per scheduled token, on top of the real CPU work. Scheduling, batching, the KV cache,
preemption, queueing and metrics are vLLM's own and unchanged; only the time a step takes is.
"""

from __future__ import annotations

import os
import sys
import time

_patched = False


def register() -> None:
    global _patched
    try:
        base_s = float(os.environ.get("VLLM_OTEL_BENCH_STEP_MS", "") or 0) / 1e3
        per_token_s = float(os.environ.get("VLLM_OTEL_BENCH_STEP_US_PER_TOKEN", "") or 50) / 1e6
    except ValueError:
        return
    if base_s <= 0 or _patched:
        return
    try:
        import setproctitle

        if "EngineCore" not in setproctitle.getproctitle():
            return
    except Exception:  # noqa: BLE001
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.schedule

    def schedule(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = original(self, *args, **kwargs)
        n = getattr(out, "total_num_scheduled_tokens", 0) or 0
        if n > 0:
            time.sleep(base_s + per_token_s * n)
        return out

    Scheduler.schedule = schedule  # type: ignore[method-assign]
    _patched = True
    print(f"vllm_otel_bench_pace: engine steps padded by {base_s * 1e3:g} ms + {per_token_s * 1e6:g} us/token "
          f"(pid {os.getpid()})", file=sys.stderr, flush=True)
