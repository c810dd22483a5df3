"""A custom mitigation strategy: shift traffic away from an overloaded vLLM at your load balancer.

(The built-in ``rebalance_load`` calls such a hook on any load; this one shows how to write your
own, with its own precondition: act only once a given number of requests wait.)

What a strategy is (see ``vllm_otel.mitigate.strategies.base``): typed parameters validated when
the policy loads, a precondition on the target's current metrics, one action through the
actuator (here an HTTP hook the policy points at your load balancer's API), and a verification
read from the metrics afterwards. Register it once, before the policy is loaded::

    import custom_strategy            # registers "shift_traffic"
    policy = Policy.load("policy.yaml")

and name it in the policy::

    rules:
      - failure_type: queue_overload
        strategies: [lower_queue_limits, shift_traffic]
    strategies:
      shift_traffic:
        mode: auto
        params: {hook: lb_weight, weight: 0.3, min_waiting: 4}
    actuator:
      hooks:
        lb_weight:
          method: PUT
          url: "https://lb.example/pools/vllm/members/${instance}"
          body: {weight: "${weight}", reason: "${alertname}"}

Any module imported before the policy loads can register strategies; an installed package does
it through the plugin system (see the README's plugins section).

Run ``python examples/custom_strategy.py`` to validate a policy that uses it and print what the
receiver would consider.
"""

from __future__ import annotations

from typing import Mapping

from pydantic import Field

from vllm_otel.mitigate.strategies.base import (ActionResult, Actuator, Check, Strategy, StrategyContext,
                                                Verification, register_strategy)
from vllm_otel.mitigate.strategies.common import WAITING, VerifyParams, fmt, metric, watch


class ShiftTrafficParams(VerifyParams):  # + verify_window_s, verify_interval_s
    hook: str = Field(description="name of the actuator hook that sets the instance's weight")
    weight: float = Field(0.3, ge=0.0, le=1.0, description="the instance's new share of new traffic")
    min_waiting: float = Field(4.0, ge=0.0, description="act only when at least this many requests wait")


@register_strategy
class ShiftTraffic(Strategy):
    """Lower this instance's weight at the load balancer so new requests go elsewhere.

    Reversible (set the weight back), drops no request. Applies while requests wait; verified
    when the queue is shorter than before within the window.
    """

    name = "shift_traffic"
    invasiveness = 15          # between lowering vLLM's own queue limits (14) and backpressure (16)
    Params = ShiftTrafficParams

    def applies(self, ctx: StrategyContext) -> Check:
        if ctx.target is None:
            return Check(False, "needs a target instance")
        p: ShiftTrafficParams = self.params  # type: ignore[assignment]
        waiting = metric(ctx.metrics_before, WAITING)
        if waiting is None:
            return Check(False, "queue length unknown: no metrics for the target")
        if waiting >= p.min_waiting:
            return Check(True, f"{fmt(waiting)} requests waiting >= {fmt(p.min_waiting)}")
        return Check(False, f"{fmt(waiting)} requests waiting < {fmt(p.min_waiting)}")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: ShiftTrafficParams = self.params  # type: ignore[assignment]
        assert ctx.target is not None
        # Template variables the hook's URL, headers and body may use (${instance} is added by the actuator).
        variables = {"weight": p.weight, "alertname": ctx.alert.alertname, "reason": ctx.why,
                     "action_id": ctx.action_id, "strategy": self.name}
        answer = await actuator.call(ctx.target, f"hook.{p.hook}", variables)
        return ActionResult(ok=True, detail=f"weight -> {p.weight} through hook {p.hook}",
                            data={"weight": p.weight, "answer": dict(answer)})

    async def verify(self, ctx: StrategyContext) -> Verification:
        before = metric(ctx.metrics_before, WAITING)

        def judge(m: Mapping[str, float]) -> tuple[bool, str]:
            now = metric(m, WAITING)
            if now is None or before is None:
                return False, "queue length unknown"
            return now < before or now == 0, f"waiting {fmt(before)} -> {fmt(now)}"

        ok, detail = await watch(ctx, self.params, judge)  # type: ignore[arg-type]
        return Verification(ok=ok, detail=detail)


def main() -> int:
    from vllm_otel.mitigate.policy import Policy

    policy = Policy.from_mapping({
        "targets": [{"instance": "127.0.0.1:8000", "url": "http://127.0.0.1:8000"}],
        "escalation": {"strategy": None},
        "rules": [{"failure_type": "queue_overload", "strategies": ["lower_queue_limits", "shift_traffic"]}],
        "strategies": {"shift_traffic": {"mode": "auto", "params": {"hook": "lb_weight", "weight": 0.3}}},
        "actuator": {"hooks": {"lb_weight": {"method": "PUT", "url": "http://127.0.0.1:9901/members/${instance}",
                                             "body": {"weight": "${weight}"}}}},
    })
    for name in ("lower_queue_limits", "shift_traffic"):
        s = policy.strategy(name)
        print(f"{name}: invasiveness {s.invasiveness}, mode {policy.mode(name).value}, params {s.params.model_dump()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
