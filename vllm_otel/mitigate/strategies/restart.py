"""Restarts, through the target's restart backend (``supervisor.status`` / ``supervisor.restart``).

What only a restart can change: a wedged engine core, CUDA graphs, offloading, parallelism,
memory utilisation, the visible GPUs, NCCL settings. The backend (``vllm-otel supervise``,
docker compose or Kubernetes; see :mod:`vllm_otel.mitigate.supervisor`) drains when asked, stops
the old process group, starts the patched command, waits for ``/health``, and rolls back to the
last good arguments when the new ones do not come up. Verification: vLLM answers and makes
progress again (``up`` = 1, ``stalled`` = 0), plus the intended change where it is visible.

GPU-only strategies check the platform first and say "not applicable on CPU" instead of acting.
Give ``worker.action_timeout_s`` room for a restart (vLLM takes tens of seconds to minutes).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field

from vllm_otel.mitigate.strategies.base import (ActionResult, Actuator, Check, Strategy,
                                                StrategyContext, Verification, register_strategy)
from vllm_otel.mitigate.strategies.common import (GPU_COUNT, GPU_MEM_UTIL, KV_USAGE, STALLED, UP,
                                                  WORKERS, VerifyParams, data, fmt,
                                                  memory_pressure, metric, require_gpu, serving,
                                                  watch)
from vllm_otel.mitigate.supervisor.args import get_arg

__all__ = ["RestartEngine", "RestartWorkers", "RestartNCCL", "DisableCUDAGraphs",
           "ReduceGPUMemoryUtilization", "EnableCPUOffloading", "ReduceModelParallelism", "CordonGPU"]


class NotApplicable(Exception):
    """Raised by ``changes``: the current arguments already are what the strategy would set."""


class RestartParams(VerifyParams):
    drain: bool = Field(True, description="stop admitting and let in-flight requests finish first")
    drain_timeout_s: float = Field(120.0, ge=0.0, le=3600.0)
    restart_timeout_s: float = Field(900.0, gt=0.0, le=3600.0, description="the whole restart call")
    verify_window_s: float = Field(60.0, ge=0.0, le=900.0)


class _Restart(Strategy):
    """Shared: read the current arguments when needed, ask for the restart, judge the result."""

    needs_status = False

    def changes(self, ctx: StrategyContext, status: Mapping[str, Any]) -> dict[str, Any]:
        """``set_args`` / ``remove_args`` / ``env`` of the restart; none: same arguments."""
        return {}

    def _serving_or_gone(self, ctx: StrategyContext) -> Check | None:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        return None

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: RestartParams = self.params  # type: ignore[assignment]
        status: Mapping[str, Any] = {}
        if self.needs_status:
            status = await actuator.call(ctx.target, "supervisor.status", {})  # type: ignore[arg-type]
        try:
            change = self.changes(ctx, status)
        except NotApplicable as e:
            return ActionResult(ok=False, detail=f"nothing to change: {e}")
        body = {"drain": p.drain, "drain_timeout_s": p.drain_timeout_s,
                "reason": f"{self.name}: {ctx.why}"[:2000], **change, "_timeout_s": p.restart_timeout_s}
        out = dict(await actuator.call(ctx.target, "supervisor.restart", body))  # type: ignore[arg-type]
        ok = bool(out.get("ok", True))
        pids = f"pid {out.get('old_pid')} -> {out.get('new_pid')}" if out.get("new_pid") else "restarted"
        return ActionResult(ok=ok, detail=f"{pids}; {change or 'same arguments'}",
                            data={"change": change, **{x: out.get(x) for x in
                                  ("old_pid", "new_pid", "argv", "env", "drain", "total_s", "backend")}})

    def judge_change(self, ctx: StrategyContext, m: Mapping[str, float]) -> tuple[bool, str]:
        """The intended change, where the metrics show it (default: nothing to check)."""
        return True, ""

    async def verify(self, ctx: StrategyContext) -> Verification:
        old, new = data(ctx.result, "old_pid"), data(ctx.result, "new_pid")
        if old is not None and new is not None and old == new:
            return Verification(ok=False, detail=f"the process was not replaced (pid {new})")

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            ok, why = serving(m)
            if not ok:
                return ok, why
            ok2, why2 = self.judge_change(ctx, m)
            return ok2, "; ".join(x for x in (why, why2) if x)

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=f"{detail} (pid {old} -> {new})" if new else detail)


# --- same arguments ------------------------------------------------------------------------------------

class RestartEngineParams(RestartParams):
    drain: bool = Field(False, description="a stalled engine cannot drain")
    alerts: list[str] = Field(default_factory=lambda: ["VllmEngineStalled", "VllmTargetDown"],
                              description="without metrics, these alerts alone justify a restart")


def _several_gpu_workers(ctx: StrategyContext, why_gpu: str, why_not_one: str, what: str = "") -> Check:
    """Precondition of the multi-GPU restarts: a target, a GPU platform, and more than one worker."""
    if ctx.target is None:
        return Check(False, "needs a target instance")
    if (c := require_gpu(ctx, why_gpu)) is not None:
        return c
    workers = metric(ctx.metrics_before, WORKERS)
    if workers is None or workers < 2:
        return Check(False, f"{fmt(workers)} worker(s): {why_not_one}")
    return Check(True, f"{fmt(workers)} workers" + (f" {what}" if what else ""))


@register_strategy
class RestartEngine(_Restart):
    """Restart vLLM whose engine is wedged or dead, same arguments (spec: RestartEngine).

    ``supervisor.restart`` without draining (a stalled engine core never finishes its requests):
    the process group is stopped (SIGTERM, SIGCONT so a stopped engine core handles it, SIGKILL
    after the grace period) and started again; in-flight requests fail. Applies when the engine
    is stalled (``vllm_otel_engine_stalled``) or the target does not answer; without metrics,
    when the alert itself is a stall / down alert. Verified when a new process answers and makes
    progress within the window.
    """

    name = "restart_engine"
    invasiveness = 75
    Params = RestartEngineParams

    def applies(self, ctx: StrategyContext) -> Check:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        p: RestartEngineParams = self.params  # type: ignore[assignment]
        up, stalled = metric(ctx.metrics_before, UP), metric(ctx.metrics_before, STALLED)
        if stalled is not None and stalled >= 1:
            return Check(True, "the engine is stalled")
        if up is not None and up < 1:
            return Check(True, "the target does not answer")
        if up is None and stalled is None and ctx.alert.alertname in p.alerts:
            return Check(True, f"no metrics; the alert {ctx.alert.alertname} says it is stalled or down")
        return Check(False, f"the engine answers and makes progress (up={fmt(up)}, stalled={fmt(stalled)})")


@register_strategy
class RestartWorkers(_Restart):
    """Gracefully restart vLLM's engine core and workers, same arguments (spec: RestartWorkers).

    vLLM V1 cannot restart its workers alone: the engine core and its workers are one unit, so
    ``supervisor.restart`` drains the server (new requests get 503, in-flight ones finish),
    stops it and starts it again. Clears leaked or fragmented memory and any bad state in the
    workers without failing requests. Applies to an instance that answers and makes progress (a
    stalled one cannot drain: ``restart_engine``); verified when the new process serves.
    """

    name = "restart_workers"
    invasiveness = 70
    Params = RestartParams

    def applies(self, ctx: StrategyContext) -> Check:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        up, stalled = metric(ctx.metrics_before, UP), metric(ctx.metrics_before, STALLED)
        if up is None:
            return Check(False, "cannot tell whether the target serves: a graceful restart needs "
                                "a working engine to drain")
        if up < 1:
            return Check(False, "the target does not answer: restart_engine's case")
        if stalled is not None and stalled >= 1:
            return Check(False, "the engine is stalled and cannot drain: restart_engine's case")
        return Check(True, "the target serves: drain, then restart")


class RestartNCCLParams(RestartParams):
    drain: bool = Field(False, description="a hung collective stalls the engine: no drain")
    disable_custom_all_reduce: bool = Field(True, description="fall back from vLLM's custom "
                                                              "all-reduce kernel to NCCL's")
    disable_p2p: bool = Field(False, description="NCCL_P2P_DISABLE=1: no direct GPU-to-GPU copies")
    env: dict[str, str] = Field(default_factory=lambda: {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"},
                                description="NCCL_* / TORCH_NCCL_* variables to set")


@register_strategy
class RestartNCCL(_Restart):
    """Restart vLLM so NCCL communicators are rebuilt, with safer settings (spec: RestartNCCL).

    Communicators cannot be re-created inside a running vLLM; ``supervisor.restart`` starts a new
    process group whose workers set up NCCL afresh, with ``--disable-custom-all-reduce`` (vLLM's
    custom all-reduce kernel is a common source of hangs on some topologies) and the given
    ``NCCL_*`` / ``TORCH_NCCL_*`` variables. GPU-only and only with more than one worker
    (NCCL is not used by a single GPU); verified when the new process serves.
    """

    name = "restart_nccl"
    invasiveness = 78
    Params = RestartNCCLParams

    def applies(self, ctx: StrategyContext) -> Check:
        return _several_gpu_workers(ctx, "NCCL runs between GPUs",
                                    "NCCL is only used with tensor/pipeline parallelism",
                                    "share NCCL communicators")

    def changes(self, ctx: StrategyContext, status: Mapping[str, Any]) -> dict[str, Any]:
        p: RestartNCCLParams = self.params  # type: ignore[assignment]
        env = dict(p.env)
        if p.disable_p2p:
            env["NCCL_P2P_DISABLE"] = "1"
        set_args = {"--disable-custom-all-reduce": True} if p.disable_custom_all_reduce else {}
        return {"set_args": set_args, "env": env}


# --- changed arguments ---------------------------------------------------------------------------------

@register_strategy
class DisableCUDAGraphs(_Restart):
    """Restart vLLM with CUDA graphs off (``--enforce-eager``) (spec: DisableCUDAGraphs).

    CUDA graph capture pins extra device memory and a bad capture can crash or hang the engine;
    eager mode frees that memory and avoids graph bugs at some decode speed. Reads the current
    arguments (``supervisor.status``) and refuses when they already are eager. GPU-only (the CPU
    backend has no CUDA graphs); verified when the new process serves with ``--enforce-eager``.
    """

    name = "disable_cuda_graphs"
    invasiveness = 80
    Params = RestartParams
    needs_status = True

    def applies(self, ctx: StrategyContext) -> Check:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        if (c := require_gpu(ctx, "there are no CUDA graphs without a GPU")) is not None:
            return c
        return Check(True, "GPU target: CUDA graphs are in use unless --enforce-eager")

    def changes(self, ctx: StrategyContext, status: Mapping[str, Any]) -> dict[str, Any]:
        if get_arg(status.get("argv") or [], "--enforce-eager") is True:
            raise NotApplicable("vLLM already runs with --enforce-eager")
        return {"set_args": {"--enforce-eager": True}}

    def judge_change(self, ctx: StrategyContext, m: Mapping[str, float]) -> tuple[bool, str]:
        argv = data(ctx.result, "argv")
        if argv is None:  # compose / kubernetes answer without the process's argv
            return True, ""
        return get_arg(argv, "--enforce-eager") is True, "running with --enforce-eager"


class ReduceMemUtilParams(RestartParams):
    step: float = Field(0.05, gt=0.0, le=0.5, description="lower --gpu-memory-utilization by this")
    minimum: float = Field(0.5, gt=0.0, lt=1.0, description="never below this")
    gpu_threshold: float = Field(0.95, gt=0.0, le=1.0)
    host_available_threshold: float = Field(0.1, ge=0.0, lt=1.0)


@register_strategy
class ReduceGPUMemoryUtilization(_Restart):
    """Restart vLLM with a lower ``--gpu-memory-utilization`` (spec: ReduceGPUMemoryUtilization).

    vLLM reserves that fraction of device memory up front (weights, activations, KV cache);
    when the device runs out anyway (other processes, fragmentation, activation peaks: CUDA
    out-of-memory errors) a smaller reservation leaves headroom at the cost of KV capacity.
    On CPU the flag is the share of host memory vLLM takes, so it applies there too. Applies
    when device memory is under pressure (or out-of-memory errors were seen) and the current
    value (``vllm:cache_config_info``) minus ``step`` stays >= ``minimum``; verified when the new
    process serves with the new value.
    """

    name = "reduce_gpu_memory_utilization"
    invasiveness = 80
    Params = ReduceMemUtilParams

    def target_value(self, ctx: StrategyContext) -> float | None:
        cur = metric(ctx.metrics_before, GPU_MEM_UTIL)
        return None if cur is None else round(cur - self.params.step, 4)  # type: ignore[attr-defined]

    def applies(self, ctx: StrategyContext) -> Check:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        p: ReduceMemUtilParams = self.params  # type: ignore[assignment]
        new = self.target_value(ctx)
        if new is None:
            return Check(False, "current --gpu-memory-utilization unknown (no vllm:cache_config_info)")
        if new < p.minimum:
            return Check(False, f"{new + p.step:.2f} - {p.step} would go below the minimum {p.minimum}")
        oom = any("out of memory" in e.lower() for e in ctx.errors)
        pressure = memory_pressure(ctx, p.gpu_threshold, p.host_available_threshold)
        if oom or pressure:
            return Check(True, f"{'out-of-memory errors seen; ' if oom else ''}{pressure.reason}; "
                               f"{new + p.step:.2f} -> {new:.2f}")
        return Check(False, f"no memory pressure: {pressure.reason}")

    def changes(self, ctx: StrategyContext, status: Mapping[str, Any]) -> dict[str, Any]:
        new = self.target_value(ctx)
        if new is None:
            raise NotApplicable("current value unknown")
        return {"set_args": {"--gpu-memory-utilization": new}}

    def judge_change(self, ctx: StrategyContext, m: Mapping[str, float]) -> tuple[bool, str]:
        now = metric(m, GPU_MEM_UTIL)
        want = ((data(ctx.result, "change") or {}).get("set_args") or {}).get("--gpu-memory-utilization")
        if now is None or want is None:
            return True, "new value not reported"
        return abs(now - want) < 1e-6, f"--gpu-memory-utilization now {now:g}"


class CPUOffloadParams(RestartParams):
    kind: Literal["kv", "weights"] = Field("kv", description="kv: --kv-offloading-size (KV blocks "
                                                           "to host memory); weights: --cpu-offload-gb")
    size_gb: float = Field(8.0, gt=0.0, le=4096.0)
    gpu_threshold: float = Field(0.95, gt=0.0, le=1.0)
    kv_threshold: float = Field(0.9, gt=0.0, le=1.0)


@register_strategy
class EnableCPUOffloading(_Restart):
    """Restart vLLM with part of its memory in host RAM (spec: EnableCPUOffloading).

    ``kind: kv`` sets ``--kv-offloading-size`` (GiB of host memory for KV blocks, native
    backend): more KV capacity, fewer preemptions. ``kind: weights`` sets ``--cpu-offload-gb``:
    weights streamed from host memory free device memory for the KV cache, at a latency cost.
    GPU-only (on CPU everything already is host memory); applies under GPU memory or KV
    pressure; refuses when the current arguments already offload as much. Verified when the new
    process serves.
    """

    name = "enable_cpu_offloading"
    invasiveness = 82
    Params = CPUOffloadParams
    needs_status = True

    def applies(self, ctx: StrategyContext) -> Check:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        if (c := require_gpu(ctx, "on CPU all memory already is host memory")) is not None:
            return c
        p: CPUOffloadParams = self.params  # type: ignore[assignment]
        kv = metric(ctx.metrics_before, KV_USAGE)
        pressure = memory_pressure(ctx, p.gpu_threshold, 1.0)
        if pressure or (kv is not None and kv >= p.kv_threshold):
            return Check(True, f"{pressure.reason}; KV usage {fmt(kv)}")
        return Check(False, f"no memory pressure: {pressure.reason}; KV usage {fmt(kv)}")

    def changes(self, ctx: StrategyContext, status: Mapping[str, Any]) -> dict[str, Any]:
        p: CPUOffloadParams = self.params  # type: ignore[assignment]
        flag = "--kv-offloading-size" if p.kind == "kv" else "--cpu-offload-gb"
        cur = get_arg(status.get("argv") or [], flag)
        try:
            if isinstance(cur, str) and float(cur) >= p.size_gb:
                raise NotApplicable(f"{flag} is already {cur}")
        except ValueError:
            pass
        set_args: dict[str, Any] = {flag: p.size_gb}
        if p.kind == "kv":
            set_args["--kv-offloading-backend"] = "native"
        return {"set_args": set_args}


class ReduceParallelismParams(RestartParams):
    tensor_parallel_size: int | None = Field(None, ge=1, description="None: half the current one")


def _tp(status: Mapping[str, Any]) -> int:
    cur = get_arg(status.get("argv") or [], "--tensor-parallel-size")
    try:
        return int(cur) if isinstance(cur, str) else 1
    except ValueError:
        return 1


@register_strategy
class ReduceModelParallelism(_Restart):
    """Restart vLLM on fewer GPUs: lower ``--tensor-parallel-size`` (spec: ReduceModelParallelism).

    When a GPU or its interconnect misbehaves (NVLink errors, NCCL hangs), serving on fewer
    GPUs keeps the model up at lower throughput, if it fits. Reads the current tensor-parallel
    size (``supervisor.status``) and halves it (or uses the given size); a model that no longer
    fits does not come up and the backend rolls back. GPU-only and only with TP > 1; verified
    when the new process serves.
    """

    name = "reduce_model_parallelism"
    invasiveness = 85
    Params = ReduceParallelismParams
    needs_status = True

    def applies(self, ctx: StrategyContext) -> Check:
        return _several_gpu_workers(ctx, "tensor parallelism spans GPUs", "nothing to reduce (TP=1)")

    def changes(self, ctx: StrategyContext, status: Mapping[str, Any]) -> dict[str, Any]:
        cur = _tp(status)
        want = self.params.tensor_parallel_size or cur // 2  # type: ignore[attr-defined]
        if want < 1 or want >= cur:
            raise NotApplicable(f"tensor-parallel size is {cur}; {want} is not smaller")
        return {"set_args": {"--tensor-parallel-size": want}}


class CordonGPUParams(RestartParams):
    gpu_label: str = Field("gpu", description="alert label with the NVML index of the bad GPU")


@register_strategy
class CordonGPU(_Restart):
    """Restart vLLM without the GPU an alert names (spec: CordonGPU).

    Hides the GPU from vLLM (``CUDA_VISIBLE_DEVICES`` of the rest, ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    so indices match NVML's) and lowers ``--tensor-parallel-size`` to the largest power of two
    that fits the remaining GPUs. For a GPU with XID / ECC / row-remap errors: serve on the
    healthy ones until it is serviced. GPU-only, needs the alert's ``gpu`` label and at least two
    GPUs (with one, take the instance out instead: drain_instance / rebalance_load). Verified
    when the new process serves.
    """

    name = "cordon_gpu"
    invasiveness = 88
    Params = CordonGPUParams
    needs_status = True

    def _bad(self, ctx: StrategyContext) -> str | None:
        return ctx.alert.labels.get(self.params.gpu_label)  # type: ignore[attr-defined]

    def applies(self, ctx: StrategyContext) -> Check:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        if (c := require_gpu(ctx, "there is no GPU to cordon")) is not None:
            return c
        if self._bad(ctx) is None:
            return Check(False, f"the alert names no GPU (label {self.params.gpu_label!r})")  # type: ignore[attr-defined]
        n = metric(ctx.metrics_before, GPU_COUNT)
        if n is None or n < 2:
            return Check(False, f"{fmt(n)} GPU(s): cordoning the only GPU means taking the instance out")
        return Check(True, f"GPU {self._bad(ctx)} of {fmt(n)}")

    def changes(self, ctx: StrategyContext, status: Mapping[str, Any]) -> dict[str, Any]:
        bad = str(self._bad(ctx))
        visible = (status.get("env") or {}).get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",")] if visible else \
            [str(i) for i in range(int(metric(ctx.metrics_before, GPU_COUNT) or 0))]
        if bad not in gpus:
            raise NotApplicable(f"GPU {bad} is not among the visible ones {gpus}")
        rest = [g for g in gpus if g != bad]
        tp = _tp(status)
        new_tp = 1
        while new_tp * 2 <= min(tp, len(rest)):
            new_tp *= 2
        change: dict[str, Any] = {"env": {"CUDA_VISIBLE_DEVICES": ",".join(rest),
                                          "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}}
        if new_tp != tp:
            change["set_args"] = {"--tensor-parallel-size": new_tp}
        return change
