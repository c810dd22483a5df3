"""Escalate to a human: the strategy of last resort, and the one the guards fall back on."""

from __future__ import annotations

from pathlib import Path

import httpx
from pydantic import AnyHttpUrl, Field

from vllm_otel.mitigate.records import iso
from vllm_otel.mitigate.strategies.base import (ActionResult, Actuator, Check, Strategy,
                                                StrategyContext, StrategyParams, Verification,
                                                register_strategy)
from vllm_otel.redact import redact_mapping, redact_text

__all__ = ["EscalateToHuman", "EscalateParams"]


class EscalateParams(StrategyParams):
    url: AnyHttpUrl = Field(description="HTTP hook that reaches a human (chat, pager, ticket system)")
    timeout_s: float = Field(5.0, gt=0.0, le=60.0)
    # A path, not the secret: the token is read when sending, so it never sits in the policy,
    # the audit trail or the store.
    token_file: Path | None = Field(None, description="file holding a bearer token for the hook")


@register_strategy
class EscalateToHuman(Strategy):
    """POST the alert, the target and the reason to an HTTP hook so a human takes over.

    Touches nothing on vLLM. Used when the guards stop automation (blast radius, stale data,
    open circuit breaker, every strategy failed) and for alerts that only a human should handle.
    The JSON body has ``text`` (chat hooks show it) plus structured fields.
    """

    name = "escalate_to_human"
    invasiveness = 0
    needs_target = False
    Params = EscalateParams

    def applies(self, ctx: StrategyContext) -> Check:
        return Check(True, "a human can always be told")

    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        p: EscalateParams = self.params  # type: ignore[assignment]
        alert = ctx.alert
        instance = ctx.target.instance if ctx.target else alert.instance
        body = {
            "text": f"[vllm-otel] {alert.alertname} on {instance or 'unknown instance'}: "
                    f"{ctx.why or 'needs a human'}",
            "source": "vllm-otel",
            "reason": ctx.why,
            "action_id": ctx.action_id,
            "alert": {"alertname": alert.alertname, "fingerprint": alert.fingerprint,
                      "instance": alert.instance, "starts_at": iso(alert.starts_at),
                      "labels": redact_mapping(alert.labels),
                      "annotations": redact_mapping(alert.annotations),
                      "generator_url": alert.generator_url},
            "metrics": ctx.metrics_before,
            "recent_errors": [redact_text(e) for e in ctx.errors],
        }
        headers = {"User-Agent": "vllm-otel-receiver"}
        if p.token_file is not None:
            headers["Authorization"] = f"Bearer {p.token_file.read_text().strip()}"
        async with httpx.AsyncClient(timeout=p.timeout_s) as client:
            r = await client.post(str(p.url), json=body, headers=headers)
        ok = 200 <= r.status_code < 300
        return ActionResult(ok=ok, detail=f"hook answered HTTP {r.status_code}",
                            data={"status_code": r.status_code})

    async def verify(self, ctx: StrategyContext) -> Verification:
        # The only observable effect is that the hook took the message.
        ok = bool(ctx.result and ctx.result.ok)
        return Verification(ok=ok, detail="hook accepted the escalation" if ok else "hook refused it")
