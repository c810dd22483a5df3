"""Live limits: change how much work a running vLLM admits, through its control endpoints.

Every strategy here is reversible and drops no work: it changes a limit the scheduler or the
API server checks on each step / each new request (``control.set_max_running``,
``control.set_token_budget``, ``control.set_queue_limits``). A limit stays until it is changed
again or the server restarts (a restart starts from its command-line arguments).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pydantic import Field

from vllm_otel.mitigate.strategies.base import (ActionResult, Actuator, Check, Strategy,
                                                StrategyContext, Verification, register_strategy)
from vllm_otel.mitigate.strategies.common import (KV_SIZE_TOKENS, KV_USAGE, REJECTIONS, RUNNING,
                                                  STALLED, UP, WAITING, VerifyParams, control,
                                                  data, fmt, load, metric, watch)

__all__ = ["ReduceBatchSize", "OptimizeScheduler", "LowerQueueLimits", "EnableBackpressure",
           "DrainInstance"]


def _target(ctx: StrategyContext) -> Check | None:
    return None if ctx.target is not None else Check(False, "needs a target instance")


def _admission(limits: Mapping[str, Any] | None) -> int | None:
    """The running-request limit the scheduler admits up to: vLLM's admission limit
    (``max_num_active_reqs``) where it has one, else its slot count."""
    limits = limits or {}
    active = limits.get("max_num_active_reqs")
    return active if active is not None else limits.get("max_num_running_reqs")


def _improved(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[bool, str]:
    """Queue shorter, or KV-cache use lower, than before the action."""
    wb, wa = metric(before, WAITING), metric(after, WAITING)
    kb, ka = metric(before, KV_USAGE), metric(after, KV_USAGE)
    if wb is not None and wa is not None and (wa < wb or (wb > 0 and wa == 0)):
        return True, f"waiting {fmt(wb)} -> {fmt(wa)}"
    if kb is not None and ka is not None and ka < kb:
        return True, f"KV-cache usage {kb:.0%} -> {ka:.0%}"
    return False, f"no improvement: waiting {fmt(wb)} -> {fmt(wa)}, KV usage {fmt(kb)} -> {fmt(ka)}"


# --- ReduceBatchSize -------------------------------------------------------------------------------

class ReduceBatchSizeParams(VerifyParams):
    max_num_seqs: int | None = Field(None, ge=1, description="the new limit; None: factor x running")
    factor: float = Field(0.5, gt=0.0, lt=1.0, description="new limit = running x factor")
    min_num_seqs: int = Field(1, ge=1)


@register_strategy
class ReduceBatchSize(Strategy):
    """Lower the number of requests the scheduler runs at once (spec: ReduceBatchSize).

    Sets the engine scheduler's admission limit live (``control.set_max_running``; vLLM's
    ``max_num_active_reqs``, what ``--max-num-active-seqs`` sets): running requests above the new
    limit finish normally, no new one is admitted until the batch is under it. Fewer concurrent
    sequences need less KV cache, which stops preemption storms and KV exhaustion at the price
    of throughput. Applies when running > the new limit or requests
    wait; verified when ``running <= limit`` within the window.
    """

    name = "reduce_batch_size"
    invasiveness = 10
    Params = ReduceBatchSizeParams

    def limit(self, ctx: StrategyContext) -> int | None:
        p: ReduceBatchSizeParams = self.params  # type: ignore[assignment]
        if p.max_num_seqs is not None:
            return p.max_num_seqs
        running = metric(ctx.metrics_before, RUNNING)
        if running is None:
            return None
        return max(p.min_num_seqs, math.floor(running * p.factor))

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _target(ctx)) is not None:
            return c
        running, waiting = metric(ctx.metrics_before, RUNNING), metric(ctx.metrics_before, WAITING)
        limit = self.limit(ctx)
        if running is None or limit is None:
            return Check(False, "running requests unknown: no metrics for the target")
        if running > limit or (waiting or 0) > 0:
            return Check(True, f"running {fmt(running)}, waiting {fmt(waiting)}, new limit {limit}")
        return Check(False, f"running {fmt(running)} <= limit {limit} and nothing waits: "
                            "a lower limit changes nothing")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        limit = self.limit(ctx)
        if limit is None:
            return ActionResult(ok=False, detail="cannot compute a limit without metrics")
        out = await control(actuator, ctx, "set_max_running", {"max_num_seqs": limit})
        now, before = _admission(out.get("after")), _admission(out.get("before"))
        ok = now == limit
        return ActionResult(ok=ok, detail=f"running-request limit {before} -> {now}",
                            data={"limit": limit, "before": before, "after": now})

    async def verify(self, ctx: StrategyContext) -> Verification:
        limit = data(ctx.result, "limit")

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            r = metric(m, RUNNING)
            if r is None:
                return False, "running unknown"
            return r <= limit, f"running {fmt(r)} vs limit {limit}"

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail, data={"limit": limit})


# --- OptimizeScheduler ---------------------------------------------------------------------------

class OptimizeSchedulerParams(VerifyParams):
    max_num_batched_tokens: int | None = Field(None, ge=16, description="new per-step token budget")
    factor: float = Field(0.5, gt=0.0, lt=1.0, description="new budget = current x factor")
    min_num_batched_tokens: int = Field(256, ge=16)
    kv_threshold: float = Field(0.85, gt=0.0, le=1.0)


@register_strategy
class OptimizeScheduler(Strategy):
    """Shrink the scheduler's per-step token budget (spec: OptimizeScheduler).

    Sets ``max_num_scheduled_tokens`` live (``control.set_token_budget``). A smaller budget
    splits long prompts into smaller chunked-prefill pieces, so decodes are not starved by one
    big prefill, and KV blocks are claimed more slowly: latency and KV pressure go down, peak
    throughput goes down too. Applies when the engine is loaded and requests wait or the KV
    cache is nearly full; verified when the queue or KV usage goes down within the window.
    """

    name = "optimize_scheduler"
    invasiveness = 12
    Params = OptimizeSchedulerParams

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _target(ctx)) is not None:
            return c
        p: OptimizeSchedulerParams = self.params  # type: ignore[assignment]
        m = ctx.metrics_before
        waiting, kv = metric(m, WAITING), metric(m, KV_USAGE)
        if waiting is None and kv is None:
            return Check(False, "queue and KV usage unknown: no metrics for the target")
        if (waiting or 0) > 0 or (kv or 0) >= p.kv_threshold:
            return Check(True, f"waiting {fmt(waiting)}, KV usage {fmt(kv)}")
        return Check(False, f"nothing waits and KV usage {fmt(kv)} < {p.kv_threshold}")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: OptimizeSchedulerParams = self.params  # type: ignore[assignment]
        status = await control(actuator, ctx, "status")
        current = (status.get("engine") or {}).get("max_num_scheduled_tokens")
        if p.max_num_batched_tokens is not None:
            new = p.max_num_batched_tokens
        elif current is None:
            return ActionResult(ok=False, detail="vLLM did not report its token budget")
        else:
            new = max(p.min_num_batched_tokens, int(current * p.factor))
        if current is not None and new >= current:
            return ActionResult(ok=False, detail=f"token budget is already {current} <= {new}",
                                data={"before": current})
        out = await control(actuator, ctx, "set_token_budget", {"max_num_batched_tokens": new})
        now = (out.get("after") or {}).get("max_num_scheduled_tokens")
        return ActionResult(ok=now == new, detail=f"max_num_scheduled_tokens {current} -> {now}",
                            data={"before": current, "budget": new, "after": now})

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = ctx.metrics_before
        ok, detail = await watch(ctx, self.params, lambda m: _improved(before, m))  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)


# --- queue limits ---------------------------------------------------------------------------------

async def _queue_limits(actuator: Actuator, ctx: StrategyContext, reqs: Any, tokens: Any,
                        keep: str | None) -> dict[str, Any]:
    """Set the queue limits; the one named in ``keep`` is left out, so it keeps its current
    value (another strategy's limit). Front end only: works while the engine core is busy."""
    body = {"max_num_queued_reqs": reqs, "max_num_queued_tokens": tokens}
    body.pop(keep or "", None)
    return await control(actuator, ctx, "set_queue_limits", body)


class LowerQueueLimitsParams(VerifyParams):
    max_num_queued_reqs: int = Field(64, ge=0, description="cap on unfinished requests (running + "
                                                           "waiting); more get HTTP 503")
    max_num_queued_tokens: int | None = Field(None, ge=0, description="None: keep the current one")


@register_strategy
class LowerQueueLimits(Strategy):
    """Cap the requests vLLM accepts; the excess gets HTTP 503 at once (spec: LowerQueueLimits).

    Sets the API server's ``max_num_queued_reqs`` live (``control.set_queue_limits``): vLLM's
    admission check counts unfinished requests (running + waiting) and rejects new ones above
    the cap with 503, so load balancers and clients retry elsewhere instead of queueing here for
    minutes. Applies when more requests are in flight than the cap; verified when running +
    waiting is at or under it within the window.
    """

    name = "lower_queue_limits"
    invasiveness = 14
    Params = LowerQueueLimitsParams

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _target(ctx)) is not None:
            return c
        p: LowerQueueLimitsParams = self.params  # type: ignore[assignment]
        n = load(ctx.metrics_before)
        if n is None:
            return Check(False, "requests in flight unknown: no metrics for the target")
        if n > p.max_num_queued_reqs:
            return Check(True, f"{fmt(n)} requests in flight > cap {p.max_num_queued_reqs}")
        return Check(False, f"{fmt(n)} requests in flight <= cap {p.max_num_queued_reqs}")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: LowerQueueLimitsParams = self.params  # type: ignore[assignment]
        keep = "max_num_queued_tokens" if p.max_num_queued_tokens is None else None
        out = await _queue_limits(actuator, ctx, p.max_num_queued_reqs, p.max_num_queued_tokens, keep)
        after = out.get("after") or {}
        ok = after.get("max_num_queued_reqs") == p.max_num_queued_reqs
        return ActionResult(ok=ok, detail=f"queue limits {out.get('before')} -> {after}",
                            data={"limit": p.max_num_queued_reqs, **{k: out.get(k) for k in ("before", "after")}})

    async def verify(self, ctx: StrategyContext) -> Verification:
        limit = data(ctx.result, "limit")
        rej0 = metric(ctx.metrics_before, REJECTIONS)

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            n = load(m)
            rej = metric(m, REJECTIONS)
            extra = f", {fmt(rej - rej0)} rejected" if rej is not None and rej0 is not None else ""
            if n is None:
                return False, "requests in flight unknown"
            return n <= limit, f"{fmt(n)} in flight vs cap {limit}{extra}"

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)


class EnableBackpressureParams(VerifyParams):
    max_num_queued_tokens: int | None = Field(None, ge=0, description="prompt tokens allowed in "
                                                                      "prefill; None: kv_fraction x KV size")
    kv_fraction: float = Field(0.5, gt=0.0, le=4.0)
    kv_threshold: float = Field(0.8, gt=0.0, le=1.0, description="act when KV usage is at least this")


@register_strategy
class EnableBackpressure(Strategy):
    """Bound the prompt tokens waiting for prefill; new requests over it get 503 (spec: EnableBackpressure).

    Sets the API server's ``max_num_queued_tokens`` live (``control.set_queue_limits``, keeping
    the request cap as it is): a token-based admission limit, sized from the KV cache, so that a
    burst of long prompts is pushed back to the load balancer before it fills the KV cache and
    forces preemptions. Applies when requests wait and the KV cache is nearly full; verified when
    the queue shrinks within the window.
    """

    name = "enable_backpressure"
    invasiveness = 16
    Params = EnableBackpressureParams

    def tokens(self, ctx: StrategyContext) -> int | None:
        p: EnableBackpressureParams = self.params  # type: ignore[assignment]
        if p.max_num_queued_tokens is not None:
            return p.max_num_queued_tokens
        size = metric(ctx.metrics_before, KV_SIZE_TOKENS)
        return None if size is None else int(size * p.kv_fraction)

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _target(ctx)) is not None:
            return c
        p: EnableBackpressureParams = self.params  # type: ignore[assignment]
        waiting, kv = metric(ctx.metrics_before, WAITING), metric(ctx.metrics_before, KV_USAGE)
        if waiting is None or kv is None:
            return Check(False, "queue or KV usage unknown: no metrics for the target")
        if self.tokens(ctx) is None:
            return Check(False, "KV cache size unknown (vllm:cache_config_info) and no "
                                "max_num_queued_tokens given")
        if waiting > 0 and kv >= p.kv_threshold:
            return Check(True, f"waiting {fmt(waiting)}, KV usage {kv:.0%}")
        return Check(False, f"waiting {fmt(waiting)}, KV usage {kv:.0%}: no pressure to push back")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        tokens = self.tokens(ctx)
        if tokens is None:
            return ActionResult(ok=False, detail="no token limit could be computed")
        out = await _queue_limits(actuator, ctx, None, tokens, "max_num_queued_reqs")
        after = out.get("after") or {}
        return ActionResult(ok=after.get("max_num_queued_tokens") == tokens,
                            detail=f"queue limits {out.get('before')} -> {after}",
                            data={"tokens": tokens, "before": out.get("before"), "after": after})

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = ctx.metrics_before

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            wb, wa = metric(before, WAITING), metric(m, WAITING)
            if wa is None or wb is None:
                return False, "queue length unknown"
            rej = (metric(m, REJECTIONS) or 0) - (metric(before, REJECTIONS) or 0)
            return wa < wb or wa == 0, f"waiting {fmt(wb)} -> {fmt(wa)}, {fmt(rej)} rejected"

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)


# --- DrainInstance ----------------------------------------------------------------------------------

class DrainInstanceParams(VerifyParams):
    verify_window_s: float = Field(120.0, ge=0.0, le=900.0, description="time allowed to drain")
    lb_hook: str | None = Field(None, description="actuator hook that also takes the instance out "
                                                  "of the load balancer (actuator.hooks.<name>)")


@register_strategy
class DrainInstance(Strategy):
    """Stop admitting requests and let the in-flight ones finish (spec: DrainInstance).

    Sets the request cap to 0 (``control.set_queue_limits``): every new request gets 503, which
    load balancers and OpenAI clients retry elsewhere; running requests complete. With
    ``lb_hook`` it also calls that external hook (take the instance out of the pool). The
    instance stays drained until a restart or a human lifts the limit: a step before
    maintenance, not a fix. Applies to an instance that answers and makes progress (a stalled
    engine never drains: that is ``restart_engine``); verified when nothing is in flight.
    """

    name = "drain_instance"
    invasiveness = 20
    Params = DrainInstanceParams

    def required_hooks(self) -> list[str]:
        hook = self.params.lb_hook  # type: ignore[attr-defined]
        return [hook] if hook else []

    def applies(self, ctx: StrategyContext) -> Check:
        if (c := _target(ctx)) is not None:
            return c
        up, stalled = metric(ctx.metrics_before, UP), metric(ctx.metrics_before, STALLED)
        if up is not None and up < 1:
            return Check(False, "the target does not answer: nothing to drain")
        if stalled is not None and stalled >= 1:
            return Check(False, "the engine is stalled: in-flight requests would never finish")
        return Check(True, f"{fmt(load(ctx.metrics_before))} requests in flight to drain")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: DrainInstanceParams = self.params  # type: ignore[assignment]
        out = await _queue_limits(actuator, ctx, 0, None, "max_num_queued_tokens")
        result: dict[str, Any] = {"before": out.get("before"), "after": out.get("after")}
        if p.lb_hook:
            resp = await actuator.call(ctx.target, f"hook.{p.lb_hook}",  # type: ignore[arg-type]
                                       {"alertname": ctx.alert.alertname, "reason": ctx.why,
                                        "action": "drain"})
            result["hook"] = dict(resp)
        ok = (out.get("after") or {}).get("max_num_queued_reqs") == 0
        return ActionResult(ok=ok, detail="new requests get 503; waiting for in-flight ones", data=result)

    async def verify(self, ctx: StrategyContext) -> Verification:
        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            n = load(m)
            return (n == 0, f"{fmt(n)} requests still in flight") if n is not None else (False, "unknown")

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail="drained: nothing in flight" if ok else detail)
