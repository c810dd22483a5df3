"""External hooks: what lives outside vLLM (load balancer, autoscaler), through ``hook.<name>``.

The hooks are HTTP calls configured in the policy (``actuator.hooks``): method, URL, headers
with secrets from files, a JSON body template. Nothing is executed locally. The strategy passes
template variables: ``instance``, ``target_url``, ``alertname``, ``reason`` and its own
parameters. Success is judged on the target, not on the hook's 2xx alone.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field

from vllm_otel.mitigate.strategies.base import (ActionResult, Actuator, Check, Strategy,
                                                StrategyContext, Verification, register_strategy)
from vllm_otel.mitigate.strategies.common import (KV_USAGE, WAITING, VerifyParams, fmt, metric,
                                                  watch)

__all__ = ["RebalanceLoad", "ScaleResources"]


class _HookParams(VerifyParams):
    hook: str = Field(min_length=1, description="name under actuator.hooks")
    waiting_threshold: int = Field(1, ge=0, description="act when at least this many requests wait ...")
    kv_threshold: float = Field(0.9, gt=0.0, le=1.0, description="... or KV usage is at least this")
    verify_window_s: float = Field(120.0, ge=0.0, le=900.0)


def _pressure(ctx: StrategyContext, p: _HookParams) -> Check:
    if ctx.target is None:
        return Check(False, "needs a target instance")
    waiting, kv = metric(ctx.metrics_before, WAITING), metric(ctx.metrics_before, KV_USAGE)
    if waiting is None and kv is None:
        return Check(False, "queue and KV usage unknown: no metrics for the target")
    if (waiting is not None and waiting >= max(1, p.waiting_threshold)) or (kv is not None and kv >= p.kv_threshold):
        return Check(True, f"waiting {fmt(waiting)}, KV usage {fmt(kv)}")
    return Check(False, f"waiting {fmt(waiting)}, KV usage {fmt(kv)}: below the thresholds")


def _relieved(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[bool, str]:
    wb, wa = metric(before, WAITING), metric(after, WAITING)
    kb, ka = metric(before, KV_USAGE), metric(after, KV_USAGE)
    if wb is not None and wa is not None and wa < wb:
        return True, f"waiting {fmt(wb)} -> {fmt(wa)}"
    if kb is not None and ka is not None and ka < kb:
        return True, f"KV usage {kb:.0%} -> {ka:.0%}"
    return False, f"load on the target not lower: waiting {fmt(wb)} -> {fmt(wa)}, KV {fmt(kb)} -> {fmt(ka)}"


async def _call(self: Strategy, ctx: StrategyContext, actuator: Actuator, extra: Mapping[str, Any]) -> ActionResult:
    p: _HookParams = self.params  # type: ignore[assignment]
    variables = {"alertname": ctx.alert.alertname, "reason": ctx.why, "action_id": ctx.action_id,
                 "strategy": self.name, **extra}
    out = dict(await actuator.call(ctx.target, f"hook.{p.hook}", variables))  # type: ignore[arg-type]
    return ActionResult(ok=True, detail=f"hook {p.hook} answered HTTP {out.get('status_code')}",
                        data={"hook": p.hook, "status_code": out.get("status_code"), **extra})


class RebalanceParams(_HookParams):
    hook: str = Field("rebalance", min_length=1)
    weight: float = Field(0.5, ge=0.0, le=1.0, description="the instance's new share of traffic, "
                                                           "relative to its normal weight")


@register_strategy
class RebalanceLoad(Strategy):
    """Ask the load balancer to send this instance less traffic (spec: RebalanceLoad).

    Calls the configured ``hook.<hook>`` (e.g. an Envoy / NGINX / gateway admin API) with the
    instance and its new relative ``weight``; healthier peers take the rest. Applies when
    requests queue or the KV cache is nearly full; verified when the queue or KV usage of this
    instance goes down within the window.
    """

    name = "rebalance_load"
    invasiveness = 90
    Params = RebalanceParams

    def required_hooks(self) -> list[str]:
        return [self.params.hook]  # type: ignore[attr-defined]

    def applies(self, ctx: StrategyContext) -> Check:
        return _pressure(ctx, self.params)  # type: ignore[arg-type]

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        return await _call(self, ctx, actuator, {"weight": self.params.weight})  # type: ignore[attr-defined]

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = ctx.metrics_before
        ok, detail = await watch(ctx, self.params, lambda m: _relieved(before, m))  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)


class ScaleParams(_HookParams):
    hook: str = Field("scale_out", min_length=1)
    replicas_delta: int = Field(1, ge=1, le=16, description="replicas to add")
    require_improvement: bool = Field(True, description="False: the autoscaler's 2xx is success")


@register_strategy
class ScaleResources(Strategy):
    """Ask the autoscaler for more vLLM replicas (spec: ScaleResources).

    Calls the configured ``hook.<hook>`` (a Kubernetes scale subresource, a cloud autoscaler,
    a deployment pipeline) with ``replicas_delta``; new replicas take load once they are ready.
    Applies when this instance queues or its KV cache is nearly full; verified when its load
    goes down within the window (or, with ``require_improvement: false``, when the autoscaler
    accepted the request: new replicas can take longer than any window).
    """

    name = "scale_resources"
    invasiveness = 92
    Params = ScaleParams

    def required_hooks(self) -> list[str]:
        return [self.params.hook]  # type: ignore[attr-defined]

    def applies(self, ctx: StrategyContext) -> Check:
        return _pressure(ctx, self.params)  # type: ignore[arg-type]

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        return await _call(self, ctx, actuator, {"replicas_delta": self.params.replicas_delta})  # type: ignore[attr-defined]

    async def verify(self, ctx: StrategyContext) -> Verification:
        p: ScaleParams = self.params  # type: ignore[assignment]
        if not p.require_improvement:
            return Verification(ok=bool(ctx.result and ctx.result.ok), detail="the autoscaler accepted")
        before = ctx.metrics_before
        ok, detail = await watch(ctx, p, lambda m: _relieved(before, m))
        return Verification(ok=ok, detail=detail)
