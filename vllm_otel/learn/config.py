"""The policy file's ``learner:`` section: which learner, its context, its reward and its safety
settings. Validated when the policy loads, like everything else in it.

The defaults are the ones that measured best in ``benchmarks/learner_sim.py`` (README, "Learning
which mitigation works").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["LearnerConfig", "ContextConfig", "RewardConfig", "LEARNER_KINDS"]

LEARNER_KINDS = ("thompson", "ucb", "rules", "rule_based")


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContextConfig(_Cfg):
    """What makes two incidents "the same situation" for the learner.

    Always the failure type (else the alert name); optionally the severity, the target's lifecycle
    state, and metrics cut into buckets. Finer contexts learn slower: each borrows a little evidence
    from its failure type's other contexts (``LearnerConfig.backoff``).
    """

    severity: bool = Field(False, description="critical and warning alerts learn apart (off by "
                                              "default: it halves the evidence per situation and "
                                              "measured worse in benchmarks/learner_sim.py)")
    lifecycle: bool = Field(True, description="serving / paused / sleeping / stalled / down learn apart")
    metrics: dict[str, list[float]] = Field(
        default_factory=lambda: {"kv_cache_usage": [0.9]},
        description="metric -> ascending thresholds; each cuts the metric into one more bucket")

    @field_validator("metrics")
    @classmethod
    def _ascending(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, cuts in v.items():
            if not cuts or list(cuts) != sorted(set(cuts)):
                raise ValueError(f"metrics.{name}: thresholds must be a non-empty ascending list")
        return v


class RewardConfig(_Cfg):
    """An action's reward: 1 when it worked, 0 when not, minus what it cost.

    The cost is its disruption (a restart drops every request in flight; a cache reset drops
    nothing) plus the time it took to resolve. Disruption is ``invasiveness x
    disruption_per_invasiveness`` unless ``disruption`` names the strategy.
    """

    disruption: dict[str, float] = Field(default_factory=dict,
                                         description="strategy -> disruption cost in 0..1")
    disruption_per_invasiveness: float = Field(0.003, ge=0.0, le=0.01,
                                               description="invasiveness 100 costs 0.3 by default")
    cost_per_minute: float = Field(0.02, ge=0.0, le=1.0, description="time to resolve")
    max_time_cost: float = Field(0.3, ge=0.0, le=1.0)

    @field_validator("disruption")
    @classmethod
    def _unit(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not 0.0 <= x <= 1.0}
        if bad:
            raise ValueError(f"disruption costs must be in 0..1: {bad}")
        return v

    def disruption_of(self, strategy: str, invasiveness: int) -> float:
        if strategy in self.disruption:
            return self.disruption[strategy]
        return min(1.0, invasiveness * self.disruption_per_invasiveness)

    def time_cost(self, duration_s: float | None) -> float:
        if not duration_s or duration_s <= 0:
            return 0.0
        return min(self.max_time_cost, self.cost_per_minute * duration_s / 60.0)


class LearnerConfig(_Cfg):
    """``learner:`` in the policy file. Every field has a default; ``{}`` is the measured best."""

    kind: Literal["thompson", "ucb", "rules", "rule_based"] = Field(
        "ucb", description="ucb: an upper quantile of the Beta posteriors (Bayes-UCB; default, the "
                           "lowest regret in benchmarks/learner_sim.py); thompson: Thompson "
                           "sampling; rules: the best supported rule mined from history; "
                           "rule_based: least invasive first, skipping what failed recently")
    confidence_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="a strategy in auto mode chosen with a lower posterior "
                                          "probability of success waits for a human's approval")
    context: ContextConfig = Field(default_factory=ContextConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    discount: float = Field(0.95, gt=0.0, le=1.0,
                            description="each new outcome of a strategy in a context multiplies the "
                                        "weight of its older ones there (1: never forget; drift "
                                        "needs < 1)")
    prior_successes: float = Field(1.0, gt=0.0)
    prior_failures: float = Field(1.0, gt=0.0)
    backoff: float = Field(2.0, ge=0.0, description="pseudo-outcomes a context borrows from its "
                                                    "failure type's other contexts")
    retry_after_s: float = Field(1800.0, ge=0.0,
                                 description="a strategy that failed on a target is not retried "
                                             "there for this long")
    drop_after_failures: int = Field(3, ge=1, description="this many failures in a row in a "
                                                          "context drop the strategy there ...")
    drop_for_s: float = Field(6 * 3600.0, ge=0.0, description="... for this long")
    explore_in_critical: bool = Field(
        False, description="true: on critical alerts the learner may try a strategy more "
                           "disruptive than the best known one")
    half_life_s: float | None = Field(
        4 * 86400.0, gt=0.0, description="evidence not refreshed for this long counts half (None: "
                                         "never ages), so a strategy left alone is tried again "
                                         "once the others disappoint")
    ucb_c: float = Field(0.0, ge=0.0, description="ucb: c in the posterior quantile 1 - 1/(t (ln "
                                                  "t)^c) (larger: explores more)")
    min_support: int = Field(5, ge=1, description="rules: outcomes a rule needs to be shown / used")
    min_lift: float = Field(0.15, ge=0.0, le=1.0,
                            description="rules: a narrower rule is kept when its success rate "
                                        "differs from the broader one by this much")
    seed: int | None = Field(None, description="random seed (thompson); None: fresh each start")
