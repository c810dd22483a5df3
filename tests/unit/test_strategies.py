"""Every built-in strategy: registration, parameters, precondition, action, verification.

The action is observed AT THE ACTUATOR BOUNDARY: a recording actuator stands in for the real
one and answers what vLLM's control endpoints / the supervisor / a hook answer (shapes taken
from the real server; tests/integration/test_actuators.py and tests/integration/test_supervisor.py run the real
actuator against a real vLLM and a real supervisor). Metrics likewise enter as the snapshot
values the real metrics source produces. GPU-only strategies are checked to say "not
applicable on CPU" (this machine has no GPU, and neither does the fake: nothing is faked there).
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

import pytest

from vllm_otel.mitigate.records import AlertRecord, Mode, Target
from vllm_otel.mitigate.policy import Policy, PolicyError
from vllm_otel.mitigate.strategies import (REGISTRY, ActionResult, ActuatorError, MetricsSnapshot,
                                           StrategyConfigError, StrategyContext)

I1 = "127.0.0.1:8000"
SPEC_NAMES = {
    "EmergencyGPUMemoryCleanup": "emergency_gpu_memory_cleanup", "ReduceBatchSize": "reduce_batch_size",
    "EnableCPUOffloading": "enable_cpu_offloading", "DisableCUDAGraphs": "disable_cuda_graphs",
    "ReduceModelParallelism": "reduce_model_parallelism", "OptimizeScheduler": "optimize_scheduler",
    "RestartWorkers": "restart_workers", "RestartNCCL": "restart_nccl", "HandleTimeouts": "handle_timeouts",
    "RebalanceLoad": "rebalance_load", "EnableBackpressure": "enable_backpressure",
    "ScaleResources": "scale_resources", "ResetPrefixCache": "reset_prefix_cache",
    "PauseAndResume": "pause_and_resume", "SleepAndWake": "sleep_and_wake",
    "AbortLongestRequests": "abort_longest_requests", "LowerQueueLimits": "lower_queue_limits",
    "DrainInstance": "drain_instance", "RestartEngine": "restart_engine",
    "ReduceGPUMemoryUtilization": "reduce_gpu_memory_utilization", "CordonGPU": "cordon_gpu",
    "EscalateToHuman": "escalate_to_human",
}
CPU = {"gpu_collector_up": 0.0, "gpu_count": 0.0}
GPU = {"gpu_collector_up": 1.0}


class RecordingActuator:
    """Records every call at the actuator boundary and answers from a script (action -> answer;
    an exception instance is raised)."""

    def __init__(self, answers: Mapping[str, Any] | None = None) -> None:
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, target: Target, action: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        assert isinstance(target, Target)
        self.calls.append((action, dict(params)))
        answer = self.answers.get(action, {})
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Metrics:
    """Snapshots handed out in order (the last one repeats): what verification reads."""

    def __init__(self, *values: Mapping[str, float]) -> None:
        self.values = [dict(v) for v in values]
        self.reads = 0

    async def snapshot(self, target: Target) -> MetricsSnapshot | None:
        v = self.values[min(self.reads, len(self.values) - 1)]
        self.reads += 1
        return MetricsSnapshot(values=v, at=0.0)


def alert(name: str = "VllmRequestsQueueing", **labels: str) -> AlertRecord:
    return AlertRecord(id=1, key="k", fingerprint="f", alertname=name, instance=I1, failure_type=None,
                       severity=None, starts_at=0.0, labels={"alertname": name, "instance": I1, **labels},
                       annotations={}, generator_url="", group_key="", received_at=0.0)


def context(before: Mapping[str, float], *, alertname: str = "VllmRequestsQueueing",
            labels: Mapping[str, str] | None = None, target_labels: Mapping[str, str] | None = None,
            errors: list[str] | None = None, source: Any = None) -> StrategyContext:
    return StrategyContext(alert=alert(alertname, **(labels or {})),
                           target=Target(instance=I1, labels=dict(target_labels or {})),
                           mode=Mode.AUTO, why="test", metrics_before=dict(before),
                           metrics_source=source, errors=list(errors or []))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ctl(result: Mapping[str, Any]) -> dict[str, Any]:
    """What vLLM's control endpoint answers: the action's result wrapped with its name."""
    return {"action": "x", "params": {}, "result": dict(result), "at": 0.0}


RESTARTED = {"ok": True, "old_pid": 100, "new_pid": 200, "argv": ["vllm", "--model", "m"]}


# name, params, metrics before (applies), answers, expected calls (action, params subset),
# metrics after that verify, metrics after that do not, metrics before that do not apply.
CASES: list[tuple[str, dict, dict, dict, list, dict, dict, dict]] = [
    ("reduce_batch_size", {}, {"running": 8, "waiting": 2},
     {"control.set_max_running": ctl({"before": {"max_num_running_reqs": 128, "max_num_active_reqs": 128},
                                       "after": {"max_num_running_reqs": 128, "max_num_active_reqs": 4}})},
     [("control.set_max_running", {"max_num_seqs": 4})],
     {"running": 4}, {"running": 6}, {"running": 1, "waiting": 0}),
    ("optimize_scheduler", {}, {"running": 2, "waiting": 3, "kv_cache_usage": 0.5},
     {"control.status": ctl({"engine": {"max_num_scheduled_tokens": 2048}}),
      "control.set_token_budget": ctl({"after": {"max_num_scheduled_tokens": 1024}})},
     [("control.status", {}), ("control.set_token_budget", {"max_num_batched_tokens": 1024})],
     {"waiting": 1, "kv_cache_usage": 0.5}, {"waiting": 3, "kv_cache_usage": 0.5},
     {"running": 1, "waiting": 0, "kv_cache_usage": 0.1}),
    ("lower_queue_limits", {"max_num_queued_reqs": 4}, {"running": 4, "waiting": 6},
     {"control.set_queue_limits": ctl({"after": {"max_num_queued_reqs": 4, "max_num_queued_tokens": 5000}})},
     [("control.set_queue_limits", {"max_num_queued_reqs": 4})],
     {"running": 4, "waiting": 0}, {"running": 4, "waiting": 3}, {"running": 2, "waiting": 1}),
    ("enable_backpressure", {}, {"waiting": 5, "kv_cache_usage": 0.95, "kv_cache_size_tokens": 3072},
     {"control.set_queue_limits": ctl({"after": {"max_num_queued_reqs": 7, "max_num_queued_tokens": 1536}})},
     [("control.set_queue_limits", {"max_num_queued_tokens": 1536})],
     {"waiting": 2}, {"waiting": 5}, {"waiting": 5, "kv_cache_usage": 0.3, "kv_cache_size_tokens": 3072}),
    ("drain_instance", {"lb_hook": "lb"}, {"up": 1, "stalled": 0, "running": 2, "waiting": 1},
     {"control.set_queue_limits": ctl({"after": {"max_num_queued_reqs": 0}}),
      "hook.lb": {"status_code": 200, "body": {}}},
     [("control.set_queue_limits", {"max_num_queued_reqs": 0}),
      ("hook.lb", {"action": "drain"})],
     {"running": 0, "waiting": 0}, {"running": 1, "waiting": 0}, {"up": 1, "stalled": 1}),
    ("reset_prefix_cache", {}, {"running": 0},
     {"control.reset_prefix_cache": ctl({"reset": True})},
     [("control.reset_prefix_cache", {})],
     {"up": 1, "stalled": 0}, {"up": 0}, {"running": 3}),
    ("emergency_gpu_memory_cleanup", {}, {**CPU, "host_memory_available_fraction": 0.05, "running": 0,
                                          "workers_resident_memory_bytes": 1.5e9},
     {"control.gc_workers": ctl({"workers": [{"collected": 10, "cuda_freed_bytes": None,
                                              "rss_freed_bytes": 27_000_000}]}),
      "control.reset_prefix_cache": ctl({"reset": True})},
     [("control.gc_workers", {}), ("control.reset_prefix_cache", {})],
     # CPU: the workers' own resident memory, not the host's (which other processes move).
     {"workers_resident_memory_bytes": 1.5e9 - 27e6, "host_memory_available_fraction": 0.05},
     {"workers_resident_memory_bytes": 1.5e9 - 1e6, "host_memory_available_fraction": 0.5},
     {**CPU, "host_memory_available_fraction": 0.5}),
    ("handle_timeouts", {"older_than_s": 300}, {"running": 3, "waiting": 2},
     {"control.abort_requests": ctl({"aborted": ["a", "b"], "oldest_age_s": 900})},
     [("control.abort_requests", {"older_than_s": 300})],
     {"running": 2, "waiting": 1}, {"running": 3, "waiting": 2}, {"running": 0, "waiting": 0}),
    ("abort_longest_requests", {"count": 2}, {"running": 4, "waiting": 3, "kv_cache_usage": 0.95},
     {"control.abort_requests": ctl({"aborted": ["a", "b"], "oldest_age_s": 50})},
     [("control.abort_requests", {"longest": 2})],
     {"running": 4, "waiting": 1, "kv_cache_usage": 0.95}, {"running": 4, "waiting": 3, "kv_cache_usage": 0.95},
     {"running": 4, "waiting": 0, "kv_cache_usage": 0.2}),
    ("pause_and_resume", {}, {"running": 3, "waiting": 1, "kv_cache_usage": 0.9, "stalled": 0},
     {"control.pause": ctl({"paused": True}), "control.resume": ctl({"paused": False})},
     [("control.pause", {"mode": "wait", "clear_cache": True}), ("control.resume", {})],
     {"up": 1, "stalled": 0, "paused": 0, "kv_cache_usage": 0.2}, {"up": 1, "paused": 1},
     {"running": 3, "waiting": 0, "stalled": 1}),
    ("sleep_and_wake", {}, {**GPU, "gpu_count": 1.0, "running": 0, "waiting": 0, "gpu_memory_used_fraction": 0.95},
     {"control.sleep": ctl({"sleeping": True}), "control.wake_up": ctl({"awake": True})},
     [("control.sleep", {"level": 1}), ("control.wake_up", {})],
     {"up": 1, "sleeping": 0, "gpu_memory_used_fraction": 0.5}, {"up": 1, "sleeping": 1},
     {**GPU, "gpu_count": 1.0, "running": 2, "waiting": 0, "gpu_memory_used_fraction": 0.95}),
    ("restart_workers", {}, {"up": 1, "stalled": 0},
     {"supervisor.restart": RESTARTED},
     [("supervisor.restart", {"drain": True})],
     {"up": 1, "stalled": 0}, {"up": 0}, {"up": 1, "stalled": 1}),
    ("restart_engine", {}, {"up": 1, "stalled": 1},
     {"supervisor.restart": RESTARTED},
     [("supervisor.restart", {"drain": False})],
     {"up": 1, "stalled": 0}, {"up": 1, "stalled": 1}, {"up": 1, "stalled": 0}),
    ("restart_nccl", {"disable_p2p": True}, {**GPU, "gpu_count": 2, "workers": 2},
     {"supervisor.restart": RESTARTED},
     [("supervisor.restart", {"drain": False, "set_args": {"--disable-custom-all-reduce": True},
                              "env": {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_P2P_DISABLE": "1"}})],
     {"up": 1, "stalled": 0}, {"up": 0}, {**GPU, "gpu_count": 1, "workers": 1}),
    ("disable_cuda_graphs", {}, {**GPU, "gpu_count": 1},
     {"supervisor.status": {"argv": ["vllm", "serve", "m"]},
      "supervisor.restart": {**RESTARTED, "argv": ["vllm", "serve", "m", "--enforce-eager"]}},
     [("supervisor.status", {}), ("supervisor.restart", {"set_args": {"--enforce-eager": True}})],
     {"up": 1, "stalled": 0}, {"up": 0}, {**GPU, "gpu_count": 0, "gpu_collector_up": 0}),
    ("reduce_gpu_memory_utilization", {}, {**CPU, "host_memory_available_fraction": 0.05,
                                           "gpu_memory_utilization": 0.9},
     {"supervisor.restart": RESTARTED},
     [("supervisor.restart", {"set_args": {"--gpu-memory-utilization": 0.85}})],
     {"up": 1, "gpu_memory_utilization": 0.85}, {"up": 1, "gpu_memory_utilization": 0.9},
     {**CPU, "host_memory_available_fraction": 0.05, "gpu_memory_utilization": 0.52}),
    ("enable_cpu_offloading", {}, {**GPU, "gpu_count": 1, "gpu_memory_used_fraction": 0.97},
     {"supervisor.status": {"argv": ["vllm", "serve", "m"]}, "supervisor.restart": RESTARTED},
     [("supervisor.status", {}),
      ("supervisor.restart", {"set_args": {"--kv-offloading-size": 8.0, "--kv-offloading-backend": "native"}})],
     {"up": 1}, {"up": 0}, {**GPU, "gpu_count": 1, "gpu_memory_used_fraction": 0.5, "kv_cache_usage": 0.2}),
    ("reduce_model_parallelism", {}, {**GPU, "gpu_count": 4, "workers": 4},
     {"supervisor.status": {"argv": ["vllm", "serve", "m", "-tp", "4"]}, "supervisor.restart": RESTARTED},
     [("supervisor.status", {}), ("supervisor.restart", {"set_args": {"--tensor-parallel-size": 2}})],
     {"up": 1}, {"up": 0}, {**GPU, "gpu_count": 4, "workers": 1}),
    ("cordon_gpu", {}, {**GPU, "gpu_count": 4},
     {"supervisor.status": {"argv": ["vllm", "serve", "m", "--tensor-parallel-size", "4"], "env": {}},
      "supervisor.restart": RESTARTED},
     [("supervisor.status", {}),
      ("supervisor.restart", {"env": {"CUDA_VISIBLE_DEVICES": "0,1,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                              "set_args": {"--tensor-parallel-size": 2}})],
     {"up": 1}, {"up": 0}, {**GPU, "gpu_count": 1}),
    ("rebalance_load", {}, {"waiting": 3, "kv_cache_usage": 0.4},
     {"hook.rebalance": {"status_code": 200, "body": {}}},
     [("hook.rebalance", {"weight": 0.5, "alertname": "VllmRequestsQueueing"})],
     {"waiting": 1}, {"waiting": 3, "kv_cache_usage": 0.4}, {"waiting": 0, "kv_cache_usage": 0.1}),
    ("scale_resources", {}, {"waiting": 3, "kv_cache_usage": 0.95},
     {"hook.scale_out": {"status_code": 202, "body": {}}},
     [("hook.scale_out", {"replicas_delta": 1})],
     {"waiting": 0, "kv_cache_usage": 0.5}, {"waiting": 3, "kv_cache_usage": 0.95},
     {"waiting": 0, "kv_cache_usage": 0.5}),
]
IDS = [c[0] for c in CASES]


def _ctx_for(name: str, before: Mapping[str, float], **kw: Any) -> StrategyContext:
    if name == "cordon_gpu":
        kw.setdefault("labels", {"gpu": "2"})
    return context(before, **kw)


def test_registry_holds_every_named_strategy_in_invasiveness_bands() -> None:
    assert len(REGISTRY) >= 22
    assert set(SPEC_NAMES.values()) <= set(REGISTRY.names())
    for camel, name in SPEC_NAMES.items():
        cls = REGISTRY.get(name)
        if name != "escalate_to_human":
            assert camel in (cls.__doc__ or ""), f"{name}'s docstring does not name {camel}"
    rank = {n: REGISTRY.get(n).invasiveness for n in REGISTRY.names()}
    bands = [  # live limits < cache ops < abort < pause < restart < external
        ["reduce_batch_size", "optimize_scheduler", "lower_queue_limits", "enable_backpressure", "drain_instance"],
        ["reset_prefix_cache", "emergency_gpu_memory_cleanup"],
        ["handle_timeouts", "abort_longest_requests"],
        ["pause_and_resume", "sleep_and_wake"],
        ["restart_workers", "restart_engine", "restart_nccl", "disable_cuda_graphs",
         "reduce_gpu_memory_utilization", "enable_cpu_offloading", "reduce_model_parallelism", "cordon_gpu"],
        ["rebalance_load", "scale_resources"],
    ]
    assert sorted(n for b in bands for n in b) == sorted(set(REGISTRY.names()) - {"escalate_to_human"})
    for lower, higher in zip(bands, bands[1:]):
        assert max(rank[n] for n in lower) < min(rank[n] for n in higher), (lower, higher)


@pytest.mark.parametrize("name", sorted(set(SPEC_NAMES.values())))
def test_params_are_validated_when_bound(name: str) -> None:
    with pytest.raises(StrategyConfigError, match="bogus"):
        REGISTRY.create(name, {"bogus": 1, **({"url": "http://h/x"} if name == "escalate_to_human" else {})})


@pytest.mark.parametrize("name, params, field", [
    ("reduce_batch_size", {"factor": 2}, "factor"), ("lower_queue_limits", {"max_num_queued_reqs": -1}, "max_num"),
    ("pause_and_resume", {"mode": "forever"}, "mode"), ("sleep_and_wake", {"level": 3}, "level"),
    ("enable_cpu_offloading", {"kind": "disk"}, "kind"), ("scale_resources", {"replicas_delta": 0}, "replicas"),
    ("reduce_gpu_memory_utilization", {"step": 0}, "step"), ("restart_engine", {"drain_timeout_s": -5}, "drain"),
])
def test_bad_param_values_fail_at_registration(name: str, params: dict, field: str) -> None:
    with pytest.raises(StrategyConfigError, match=field):
        REGISTRY.create(name, params)


@pytest.mark.parametrize("name, params, before, answers, calls, good, bad, not_before", CASES, ids=IDS)
def test_strategy_precondition_action_verification(name: str, params: dict, before: dict, answers: dict,
                                                   calls: list, good: dict, bad: dict, not_before: dict) -> None:
    strat = REGISTRY.create(name, {**params, "verify_window_s": 0})
    ctx = _ctx_for(name, before)
    pre = strat.applies(ctx)
    assert pre, f"{name} should apply to {before}: {pre.reason}"
    nope = strat.applies(_ctx_for(name, not_before))
    assert not nope and nope.reason, f"{name} should not apply to {not_before}"

    act = RecordingActuator(answers)
    result = run(strat.execute(ctx, act))
    assert isinstance(result, ActionResult) and result.ok, result
    assert [a for a, _ in act.calls] == [a for a, _ in calls]
    for (_, got), (_, want) in zip(act.calls, calls):
        for key, value in want.items():
            assert got.get(key) == value, f"{name}: {key}={got.get(key)!r}, want {value!r}"

    ctx.result = result
    ctx.metrics_after = dict(good)
    v = run(strat.verify(ctx))
    assert v.ok, f"{name} should verify with {good}: {v.detail}"
    ctx.metrics_after = dict(bad)
    v = run(strat.verify(ctx))
    assert not v.ok and v.detail, f"{name} should not verify with {bad}"


def test_no_metrics_means_no_live_action() -> None:
    """Unknown is not zero: strategies that need a measurement do not apply without one."""
    for name in ("reduce_batch_size", "optimize_scheduler", "lower_queue_limits", "enable_backpressure",
                 "reset_prefix_cache", "handle_timeouts", "abort_longest_requests", "pause_and_resume",
                 "sleep_and_wake", "restart_workers", "rebalance_load", "scale_resources",
                 "reduce_gpu_memory_utilization", "emergency_gpu_memory_cleanup"):
        strat = REGISTRY.create(name, {})
        assert not strat.applies(context({})), name


@pytest.mark.parametrize("name", ["enable_cpu_offloading", "disable_cuda_graphs", "cordon_gpu", "restart_nccl",
                                  "reduce_model_parallelism", "sleep_and_wake"])
def test_gpu_only_strategies_say_not_applicable_on_cpu(name: str) -> None:
    strat = REGISTRY.create(name, {})
    # What this machine's vLLM reports: the GPU collector is down (no NVML).
    busy = {"gpu_collector_up": 0.0, "gpu_count": 0.0, "workers": 4, "gpu_memory_used_fraction": 0.99,
            "kv_cache_usage": 0.99}
    c = strat.applies(context(busy, labels={"gpu": "0"}))
    assert not c and c.reason.startswith("not applicable on CPU"), c
    # A target declared CPU in the policy is CPU whatever the metrics say.
    c = strat.applies(context({**busy, "gpu_collector_up": 1, "gpu_count": 4}, labels={"gpu": "0"},
                              target_labels={"platform": "cpu"}))
    assert not c and c.reason.startswith("not applicable on CPU"), c
    # Nothing says: no guess.
    c = strat.applies(context({"workers": 4}, labels={"gpu": "0"}))
    assert not c and "platform unknown" in c.reason


def test_restart_engine_without_metrics_trusts_only_stall_and_down_alerts() -> None:
    s = REGISTRY.create("restart_engine", {})
    assert s.applies(context({}, alertname="VllmEngineStalled"))
    assert s.applies(context({"up": 0}, alertname="Anything"))
    assert not s.applies(context({}, alertname="VllmRequestsQueueing"))


def test_restart_with_nothing_to_change_does_not_restart() -> None:
    for name, status in (("disable_cuda_graphs", {"argv": ["vllm", "serve", "m", "--enforce-eager"]}),
                         ("reduce_model_parallelism", {"argv": ["vllm", "serve", "m"]}),
                         ("enable_cpu_offloading", {"argv": ["vllm", "--kv-offloading-size", "16"]}),
                         ("cordon_gpu", {"argv": ["vllm"], "env": {"CUDA_VISIBLE_DEVICES": "0,1"}})):
        act = RecordingActuator({"supervisor.status": status})
        r = run(REGISTRY.create(name, {}).execute(_ctx_for(name, {**GPU, "gpu_count": 4}), act))
        assert not r.ok and "nothing to change" in r.detail, (name, r)
        assert [a for a, _ in act.calls] == ["supervisor.status"], name


def test_restart_verification_needs_a_new_process() -> None:
    s = REGISTRY.create("restart_engine", {"verify_window_s": 0})
    ctx = context({"up": 1, "stalled": 1})
    ctx.result = ActionResult(ok=True, data={"old_pid": 5, "new_pid": 5})
    ctx.metrics_after = {"up": 1, "stalled": 0}
    assert not run(s.verify(ctx)).ok


def test_pause_always_resumes_and_sleep_always_wakes() -> None:
    act = RecordingActuator({"control.pause": ActuatorError("HTTP 500 pause failed")})
    s = REGISTRY.create("pause_and_resume", {})
    with pytest.raises(ActuatorError):
        run(s.execute(context({"running": 2, "waiting": 0}), act))
    assert [a for a, _ in act.calls] == ["control.pause", "control.resume"]
    act = RecordingActuator({"control.sleep": ActuatorError("HTTP 409 sleep not possible here")})
    with pytest.raises(ActuatorError):
        run(REGISTRY.create("sleep_and_wake", {}).execute(context({"running": 0, "waiting": 0}), act))
    assert [a for a, _ in act.calls] == ["control.sleep", "control.wake_up"]


def test_verification_watches_the_target_within_the_window() -> None:
    """The effect may take a moment: verification re-reads metrics until the window ends."""
    src = Metrics({"running": 7}, {"running": 6}, {"running": 3})
    s = REGISTRY.create("reduce_batch_size", {"max_num_seqs": 4, "verify_window_s": 5, "verify_interval_s": 0.05})
    ctx = context({"running": 8}, source=src)
    ctx.result = ActionResult(ok=True, data={"limit": 4})
    ctx.metrics_after = {"running": 8}
    v = run(s.verify(ctx))
    assert v.ok and ctx.metrics_after == {"running": 3} and src.reads == 3
    src = Metrics({"running": 7})
    s = REGISTRY.create("reduce_batch_size", {"max_num_seqs": 4, "verify_window_s": 0.2, "verify_interval_s": 0.05})
    ctx = context({"running": 8}, source=src)
    ctx.result = ActionResult(ok=True, data={"limit": 4})
    v = run(s.verify(ctx))
    assert not v.ok and "7" in v.detail
    # A read that failed (up=0, nothing else) is no verdict: watching goes on, and a window that
    # ends on failed reads says the metrics did not answer rather than "unknown".
    src = Metrics({"up": 0}, {"up": 1, "running": 3, "waiting": 0})
    s = REGISTRY.create("lower_queue_limits", {"max_num_queued_reqs": 4, "verify_window_s": 5,
                                               "verify_interval_s": 0.05})
    ctx = context({"running": 8, "waiting": 4}, source=src)
    ctx.result = ActionResult(ok=True, data={"limit": 4})
    ctx.metrics_after = {"up": 0}
    v = run(s.verify(ctx))
    assert v.ok and src.reads == 2, v.detail
    src = Metrics({"up": 0})
    s = REGISTRY.create("lower_queue_limits", {"max_num_queued_reqs": 4, "verify_window_s": 0.2,
                                               "verify_interval_s": 0.05})
    ctx = context({"running": 8, "waiting": 4}, source=src)
    ctx.result = ActionResult(ok=True, data={"limit": 4})
    v = run(s.verify(ctx))
    assert not v.ok and "did not answer" in v.detail, v.detail


def test_hooks_a_strategy_calls_must_be_configured() -> None:
    base = {"targets": [{"instance": I1}], "escalation": {"strategy": None},
            "rules": [{"alertname": "A", "strategies": ["scale_resources", "drain_instance"]}],
            "strategies": {"drain_instance": {"params": {"lb_hook": "lb"}}}}
    with pytest.raises(PolicyError) as e:
        Policy.from_mapping(base)
    assert "'scale_out'" in str(e.value) and "'lb'" in str(e.value)
    hooks = {"scale_out": {"url": "http://as.example/scale"}, "lb": {"url": "http://lb.example/${instance}"}}
    pol = Policy.from_mapping({**base, "actuator": {"hooks": hooks}})
    assert pol.strategy("scale_resources").required_hooks() == ["scale_out"]


def test_every_strategy_has_a_precondition_reason_and_a_summary() -> None:
    for name in REGISTRY.names():
        cls = REGISTRY.get(name)
        assert cls.summary() and cls.__doc__ and len(cls.__doc__.split()) > 30, name
        c = REGISTRY.create(name, {"url": "http://h/x"} if name == "escalate_to_human" else {}).applies(context({}))
        assert c.reason, name


def test_running_limit_is_the_admission_limit_where_vllm_has_one() -> None:
    from vllm_otel.mitigate.strategies.live_limits import _admission

    # vLLM >= 0.3x: the admission limit; the slot count stays (lowering it crashes the engine).
    assert _admission({"max_num_running_reqs": 256, "max_num_active_reqs": 4}) == 4
    assert _admission({"max_num_running_reqs": 4}) == 4  # older vLLM: one limit
    assert _admission(None) is None
