"""What the built-in strategies share: the metric names they read, the platform question, and
verification that watches a target for a while instead of judging one sample.

Metric names are the keys of :class:`~vllm_otel.mitigate.strategies.base.MetricsSnapshot`
values, as :mod:`vllm_otel.mitigate.actuators` builds them from Prometheus or from the target's
own ``/metrics`` (one number per target, engines summed or maxed as noted):

=============================== ===========================================================
``up``                          1 when the target answered (Prometheus ``up``; a scrape), else 0
``running`` / ``waiting``       ``vllm:num_requests_running`` / ``_waiting``, summed
``kv_cache_usage``              ``vllm:kv_cache_usage_perc``, max over engines (0..1)
``stalled``                     ``vllm_otel_engine_stalled``, max (1: no forward progress)
``preemptions_total``           ``vllm:num_preemptions_total``, summed (a counter)
``admission_rejections_total``  ``vllm:admission_rejections_total`` (503s from queue limits)
``sleeping`` / ``paused``       1 while an engine sleeps / the lifecycle says paused
``gpu_collector_up``            ``vllm_otel_gpu_collector_up`` (1: NVML sees GPUs)
``gpu_count``                   GPUs the collector reports
``gpu_memory_used_fraction``    max over GPUs of used / total device memory
``host_memory_available_fraction`` ``vllm_otel_host_memory_available_bytes`` / total
``gpu_memory_utilization``      vLLM's ``--gpu-memory-utilization`` (from cache_config_info)
``kv_cache_size_tokens``        KV capacity in tokens (from cache_config_info)
``workers``                     worker processes (``vllm_otel_process_count{role="worker"}``)
=============================== ===========================================================

Preconditions only look at these (no I/O); a value that is missing means "unknown", and a
strategy that needs it does not apply rather than guessing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Mapping

from pydantic import Field

from vllm_otel.mitigate.strategies.base import Check, StrategyContext, StrategyParams

__all__ = [
    "UP", "RUNNING", "WAITING", "KV_USAGE", "STALLED", "PREEMPTIONS", "REJECTIONS", "SLEEPING",
    "PAUSED", "GPU_COLLECTOR_UP", "GPU_COUNT", "GPU_MEM_FRACTION", "HOST_MEM_AVAILABLE",
    "GPU_MEM_UTIL", "KV_SIZE_TOKENS", "WORKERS", "WORKERS_RESIDENT", "METRIC_KEYS",
    "VerifyParams", "metric", "platform", "require_gpu", "watch", "fmt", "serving", "data",
    "memory_pressure", "memory_relieved", "resident_freed", "load", "control",
]

UP = "up"
RUNNING = "running"
WAITING = "waiting"
KV_USAGE = "kv_cache_usage"
STALLED = "stalled"
PREEMPTIONS = "preemptions_total"
REJECTIONS = "admission_rejections_total"
SLEEPING = "sleeping"
PAUSED = "paused"
GPU_COLLECTOR_UP = "gpu_collector_up"
GPU_COUNT = "gpu_count"
GPU_MEM_FRACTION = "gpu_memory_used_fraction"
HOST_MEM_AVAILABLE = "host_memory_available_fraction"
GPU_MEM_UTIL = "gpu_memory_utilization"
KV_SIZE_TOKENS = "kv_cache_size_tokens"
WORKERS = "workers"
# Resident memory of the engine core and worker processes (vllm_otel_process_resident_memory_bytes).
WORKERS_RESIDENT = "workers_resident_memory_bytes"
METRIC_KEYS = (UP, RUNNING, WAITING, KV_USAGE, STALLED, PREEMPTIONS, REJECTIONS, SLEEPING, PAUSED,
               GPU_COLLECTOR_UP, GPU_COUNT, GPU_MEM_FRACTION, HOST_MEM_AVAILABLE, GPU_MEM_UTIL,
               KV_SIZE_TOKENS, WORKERS, WORKERS_RESIDENT)

# Platforms a target label may name; anything but "cpu" has an accelerator.
_CPU = "cpu"


class VerifyParams(StrategyParams):
    """Parameters every built-in strategy has: how long verification watches the target."""

    verify_window_s: float = Field(30.0, ge=0.0, le=900.0,
                                   description="watch the target this long for the effect")
    verify_interval_s: float = Field(2.0, gt=0.0, le=60.0)


def metric(m: Mapping[str, float] | None, key: str) -> float | None:
    """A value, or None when unknown (no snapshot, or the series was absent)."""
    if not m:
        return None
    v = m.get(key)
    return None if v is None else float(v)


def fmt(v: float | None) -> str:
    return "unknown" if v is None else (f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}")


def platform(ctx: StrategyContext) -> str | None:
    """``cpu``, an accelerator name, or None when nothing says.

    The target's ``platform`` label (policy ``targets[].labels.platform``) wins; otherwise the
    GPU collector inside vLLM tells: NVML up with at least one GPU means ``gpu``, a collector that
    is down means ``cpu`` (a GPU host whose NVML is broken is then treated as CPU: the strategy
    is skipped, which is the safe mistake).
    """
    if ctx.target is not None:
        label = ctx.target.labels.get("platform")
        if label:
            return label.strip().lower()
    up = metric(ctx.metrics_before, GPU_COLLECTOR_UP)
    if up is None:
        return None
    return "gpu" if up >= 1 and (metric(ctx.metrics_before, GPU_COUNT) or 0) >= 1 else _CPU


def require_gpu(ctx: StrategyContext, what: str) -> Check | None:
    """None when the target has an accelerator; else the Check that says why not (never faked)."""
    p = platform(ctx)
    if p is None:
        return Check(False, f"platform unknown (no vllm_otel_gpu_collector_up for the target and no "
                            f"'platform' target label): not acting on a guess; {what}")
    if p == _CPU:
        return Check(False, f"not applicable on CPU: {what}")
    return None


async def watch(ctx: StrategyContext, p: VerifyParams,
                judge: Callable[[Mapping[str, float]], tuple[bool, str]]) -> tuple[bool, str]:
    """Judge the target's metrics until ``judge`` says yes or the window ends.

    Starts from ``ctx.metrics_after`` (read by the worker after its verify delay), then re-reads
    every ``verify_interval_s``. The last metrics judged are left in ``ctx.metrics_after``, so the
    audit trail stores what the verdict was based on.
    """
    deadline = time.monotonic() + p.verify_window_s
    m: Mapping[str, float] | None = ctx.metrics_after
    detail = "no metrics for the target after the action"
    while True:
        if m is not None and metric(m, UP) == 0 and metric(m, RUNNING) is None:
            # A failed read (up=0 and nothing else) says nothing about the action: keep watching,
            # and say why if the window ends here.
            detail = "the target's metrics did not answer (up=0)"
        elif m is not None:
            ok, detail = judge(m)
            if ok:
                return True, detail
        if time.monotonic() >= deadline:
            return False, detail
        await asyncio.sleep(min(p.verify_interval_s, max(0.0, deadline - time.monotonic())))
        try:
            fresh = await ctx.fresh_metrics()
        except Exception as e:  # noqa: BLE001 - unreadable metrics are a "not yet", not a crash
            detail = f"metrics unreadable: {type(e).__name__}"
            fresh = None
        if fresh is not None:
            m = fresh
            ctx.metrics_after = dict(fresh)


def serving(m: Mapping[str, float]) -> tuple[bool, str]:
    """The target answers and makes progress: ``up`` is 1 and ``stalled`` is not 1."""
    up, stalled = metric(m, UP), metric(m, STALLED)
    if up is not None and up < 1:
        return False, "the target does not answer (up=0)"
    if up is None and not m:
        return False, "no metrics"
    if stalled is not None and stalled >= 1:
        return False, "the engine is still stalled"
    return True, "vLLM answers and makes progress"


def load(m: Mapping[str, float] | None) -> float | None:
    """Requests in flight (running + waiting); None when either is unknown."""
    r, w = metric(m, RUNNING), metric(m, WAITING)
    return None if r is None or w is None else r + w


def memory_pressure(ctx: StrategyContext, gpu_threshold: float,
                    host_available_threshold: float) -> Check:
    """Device memory nearly full: GPU memory on an accelerator, host memory on CPU (where vLLM's
    "device" memory is host memory)."""
    m = ctx.metrics_before
    p = platform(ctx)
    if p not in (None, _CPU):
        used = metric(m, GPU_MEM_FRACTION)
        if used is None:
            return Check(False, "GPU memory use unknown")
        return Check(used >= gpu_threshold, f"GPU memory {used:.0%} used (threshold {gpu_threshold:.0%})")
    avail = metric(m, HOST_MEM_AVAILABLE)
    if avail is None:
        return Check(False, "host memory availability unknown")
    return Check(avail <= host_available_threshold,
                 f"host memory {avail:.0%} available (threshold {host_available_threshold:.0%})")


def memory_relieved(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[bool, str]:
    """GPU memory use went down, or (CPU) host memory availability went up."""
    b, a = metric(before, GPU_MEM_FRACTION), metric(after, GPU_MEM_FRACTION)
    if b is not None and a is not None:
        return a < b, f"GPU memory used {b:.1%} -> {a:.1%}"
    b, a = metric(before, HOST_MEM_AVAILABLE), metric(after, HOST_MEM_AVAILABLE)
    if b is not None and a is not None:
        return a > b, f"host memory available {b:.1%} -> {a:.1%}"
    return False, "memory use unknown before or after"


def resident_freed(before: Mapping[str, float], after: Mapping[str, float],
                   min_bytes: float) -> tuple[bool, str]:
    """The engine core and workers gave back at least ``min_bytes`` of resident memory (CPU: what
    a cleanup frees there; host-wide availability moves with every other process too)."""
    b, a = metric(before, WORKERS_RESIDENT), metric(after, WORKERS_RESIDENT)
    if b is None or a is None:
        return False, "the workers' resident memory is unknown before or after"
    mib = 1024 * 1024
    return b - a >= min_bytes, (f"workers' resident memory {b / mib:.1f} -> {a / mib:.1f} MiB "
                                f"(at least {min_bytes / mib:.1f} MiB to free)")


def data(result: Any, key: str, default: Any = None) -> Any:
    """A field of an ActionResult's data (the actuator's answer), tolerant of absence."""
    if result is None:
        return default
    return (result.data or {}).get(key, default)


async def control(actuator: Any, ctx: StrategyContext, action: str,
                  params: Mapping[str, Any] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """Call one live control action on the target (``control.<action>``); its ``result``.

    ``_timeout_s`` is read by the actuator (how long to wait for vLLM), never sent to vLLM.
    """
    body = dict(params or {})
    if timeout_s is not None:
        body["_timeout_s"] = timeout_s
    resp = await actuator.call(ctx.target, f"control.{action}", body)
    resp = dict(resp or {})
    out = resp.get("result", resp)
    return dict(out) if isinstance(out, Mapping) else {"value": out}
