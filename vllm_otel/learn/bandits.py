"""Learners that choose by what worked: a Bayesian contextual bandit (Thompson sampling) and
Bayes-UCB (an upper quantile of the same posteriors).

Both keep Beta posteriors of each strategy's success probability per context
(:mod:`vllm_otel.learn.evidence`) and score a candidate as *success minus cost*: its disruption
(from its invasiveness, or the policy's ``learner.reward.disruption``) and the time it takes to
resolve. Before choosing, the same safety rules apply to every learner here
(:meth:`ContextualLearner.allowed`):

* only the candidates the policy and the guards allow reach the learner;
* a strategy that failed on this target within ``retry_after_s`` is not retried there;
* a strategy that failed ``drop_after_failures`` times in a row in a context is dropped there
  for ``drop_for_s``;
* on a critical alert nothing more disruptive than the best known strategy is explored, unless
  ``explore_in_critical``;
* a strategy whose optimistic (95 %) reward is not above zero is not worth trying; when nothing is,
  the answer is ``None`` and the receiver escalates.

With no evidence in a situation, the least invasive candidate runs (the rule learner's choice).
Confidence is the posterior mean probability of success of the chosen strategy.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Mapping, Sequence

from vllm_otel.learn.config import LearnerConfig
from vllm_otel.learn.context import Context, beta_quantile, context_of, describe_context
from vllm_otel.learn.evidence import Evidence
from vllm_otel.learn.learner import EXECUTED, FAILED, Candidate, candidate_name, candidate_rank

__all__ = ["ContextualLearner", "ThompsonLearner", "UCBLearner"]


class ContextualLearner:
    """The shared part: evidence, safety rules, reporting, export. Subclasses implement
    :meth:`_choose` (pick among the allowed candidates of a context with some evidence)."""

    kind = "contextual"

    def __init__(self, config: LearnerConfig | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or LearnerConfig(kind=self.kind)  # type: ignore[arg-type]
        self.clock = clock
        self.evidence = Evidence(self.config.discount, keep_recent=self.config.drop_after_failures)
        self.rng = random.Random(self.config.seed)
        self.invasiveness: dict[str, int] = {}  # as last seen among the candidates
        self.last_reason = ""
        self.synced_through = 0  # the store's last outcome id taken in (make_learner(store=...))

    # --- evidence -----------------------------------------------------------------------------------

    def context(self, state: Mapping[str, Any], metrics: Mapping[str, float]) -> Context:
        return context_of(state, metrics, self.config.context)

    def record_outcome(self, state: Mapping[str, Any], errors: Sequence[str],
                       metrics: Mapping[str, float], strategy: str | None, outcome: str, *,
                       metrics_after: Mapping[str, float] | None = None,
                       duration_s: float | None = None, at: float | None = None) -> None:
        # Dry runs, blocks, rejections and skips say nothing about whether a strategy works.
        if strategy is None or outcome not in EXECUTED:
            return
        self.evidence.record(self.context(state, metrics), strategy, outcome == "success",
                             at=self.clock() if at is None else at, duration_s=duration_s,
                             target=state.get("target"), outcome=outcome)

    def posterior(self, ctx: Context, strategy: str) -> tuple[float, float]:
        """Beta(alpha, beta) of the success probability: prior + the context's evidence + a little
        (at most ``backoff`` pseudo-outcomes) of its failure type's evidence, both aged
        (:meth:`age_factor`)."""
        cfg = self.config
        alpha, beta = cfg.prior_successes, cfg.prior_failures
        now = self.clock()
        arm = self.evidence.arm(ctx, strategy)
        if arm is not None:
            f = self.age_factor(arm.last_at, now)
            alpha, beta = alpha + f * arm.a, beta + f * arm.b
        fam = self.evidence.family_arm(ctx[0], strategy)
        if fam is not None and fam.n > 1e-9 and cfg.backoff > 0 and len(ctx) > 1:
            w = min(1.0, cfg.backoff / fam.n) * self.age_factor(fam.last_at, now)
            alpha, beta = alpha + w * fam.a, beta + w * fam.b
        return alpha, beta

    def age_factor(self, last_at: float, now: float) -> float:
        """What evidence last refreshed at ``last_at`` still counts: it halves every
        ``half_life_s``. Discounting only forgets a strategy that keeps being chosen; a strategy
        left alone after a bad start would otherwise never be tried again, even once the
        situation changed (it got better while another got worse)."""
        h = self.config.half_life_s
        return 1.0 if h is None else 0.5 ** (max(0.0, now - last_at) / h)

    def weight(self, ctx: Context, strategy: str) -> float:
        """How much evidence (discounted outcomes, borrowed ones included) stands behind it."""
        a, b = self.posterior(ctx, strategy)
        return a + b - self.config.prior_successes - self.config.prior_failures

    def cost(self, ctx: Context, strategy: str) -> float:
        r = self.config.reward
        arm = self.evidence.arm(ctx, strategy) or self.evidence.family_arm(ctx[0], strategy)
        dur = arm.mean_duration() if arm is not None else None
        return r.disruption_of(strategy, self.invasiveness.get(strategy, 0)) + r.time_cost(dur)

    def failed_recently(self, strategy: str, target: str | None, now: float | None = None) -> bool:
        last = self.evidence.last_on_target.get((strategy, target))
        if last is None:
            return False
        now = self.clock() if now is None else now
        return last[1] in FAILED and now - last[0] <= self.config.retry_after_s

    def dropped(self, ctx: Context, strategy: str, now: float | None = None) -> bool:
        arm = self.evidence.arm(ctx, strategy)
        k = self.config.drop_after_failures
        if arm is None or len(arm.recent) < k or any(arm.recent[-k:]):
            return False
        now = self.clock() if now is None else now
        return now - arm.last_at <= self.config.drop_for_s

    # --- choosing -------------------------------------------------------------------------------------

    def allowed(self, ctx: Context, state: Mapping[str, Any], names: list[str],
                now: float) -> tuple[list[str], list[str]]:
        """The candidates the safety rules leave, and why the others were left out."""
        notes: list[str] = []
        target = state.get("target")
        left = []
        for n in names:
            if self.failed_recently(n, target, now):
                notes.append(f"{n} failed on this target within {self.config.retry_after_s:.0f} s")
            elif self.dropped(ctx, n, now):
                notes.append(f"{n} failed {self.config.drop_after_failures} times in a row here")
            else:
                left.append(n)
        sev = str(state.get("severity") or (state.get("labels") or {}).get("severity") or "")
        known = [n for n in left if self.weight(ctx, n) >= 1.0]
        if sev == "critical" and not self.config.explore_in_critical and known:
            best = max(known, key=lambda n: self.mean_reward(ctx, n))
            limit = self.invasiveness.get(best, 0)
            riskier = [n for n in left if self.invasiveness.get(n, 0) > limit]
            if riskier:
                notes.append(f"critical: not exploring {', '.join(riskier)} (more disruptive than "
                             f"the best known, {best})")
                left = [n for n in left if n not in riskier]
        worth = []
        for n in left:
            a, b = self.posterior(ctx, n)
            cost = self.cost(ctx, n)
            if a / (a + b) > cost or beta_quantile(0.95, a, b) > cost:
                worth.append(n)
            else:
                notes.append(f"{n} not worth trying (success {a / (a + b):.2f}, cost "
                             f"{self.cost(ctx, n):.2f})")
        return worth, notes

    def mean_reward(self, ctx: Context, strategy: str) -> float:
        a, b = self.posterior(ctx, strategy)
        return a / (a + b) - self.cost(ctx, strategy)

    def select_best_strategy(self, state: Mapping[str, Any], errors: Sequence[str],
                             metrics: Mapping[str, float],
                             available_strategies: Sequence[Candidate | str]) -> tuple[str | None, float]:
        now = self.clock()
        ordered = [candidate_name(c) for _, c in sorted(
            enumerate(available_strategies), key=lambda ic: (candidate_rank(ic[1]), ic[0]))]
        for c in available_strategies:
            if not isinstance(c, str):
                self.invasiveness[candidate_name(c)] = candidate_rank(c)
        ctx = self.context(state, metrics)
        left, notes = self.allowed(ctx, state, ordered, now)
        skipped = f" (skipped {'; '.join(notes)})" if notes else ""
        if not left:
            self.last_reason = ("nothing worth trying" + skipped) if ordered else "no candidates"
            return None, 0.0
        if all(self.weight(ctx, n) < 1e-9 for n in left):
            name = left[0]
            self.last_reason = (f"no outcomes yet for {describe_context(ctx)}: least invasive "
                                "candidate first" + skipped)
        else:
            name, why = self._choose(ctx, left)
            self.last_reason = f"{why} for {describe_context(ctx)}{skipped}"
        a, b = self.posterior(ctx, name)
        return name, round(a / (a + b), 4)

    def _choose(self, ctx: Context, names: list[str]) -> tuple[str, str]:
        raise NotImplementedError

    # --- reporting ------------------------------------------------------------------------------------

    def stats(self) -> list[dict[str, Any]]:
        """Per context and strategy: attempts, successes, posterior mean and 90 % interval,
        discounted weight, mean duration, expected reward, and whether it is dropped there."""
        now = self.clock()
        rows = []
        for ctx, arms in sorted(self.evidence.contexts.items()):
            for s, arm in sorted(arms.items()):
                a, b = self.posterior(ctx, s)
                rows.append({
                    "context": describe_context(ctx), "failure_type": ctx[0], "strategy": s,
                    "situation": describe_context(ctx),
                    "attempts": arm.attempts, "successes": arm.successes,
                    "weight": round(arm.n, 3), "posterior_mean": round(a / (a + b), 4),
                    "interval": [round(beta_quantile(0.05, a, b), 4), round(beta_quantile(0.95, a, b), 4)],
                    "mean_duration_s": None if arm.mean_duration() is None else round(arm.mean_duration(), 3),
                    "expected_reward": round(a / (a + b) - self.cost(ctx, s), 4),
                    "dropped": self.dropped(ctx, s, now)})
        return rows

    def scores(self) -> list[tuple[str, str, float]]:
        """(failure type, strategy, posterior mean success probability) over the whole type."""
        out = []
        p0, q0 = self.config.prior_successes, self.config.prior_failures
        for fam, arms in sorted(self.evidence.families.items()):
            for s, arm in sorted(arms.items()):
                out.append((fam, s, (p0 + arm.a) / (p0 + q0 + arm.n)))
        return out

    def rules(self) -> list[dict[str, Any]]:
        from vllm_otel.learn.rules import extract_rules

        return [r.to_json() for r in extract_rules(self.evidence, min_support=self.config.min_support,
                                                   min_lift=self.config.min_lift)]

    def export_state(self) -> dict[str, Any]:
        return self.evidence.to_json(self.kind) | {"invasiveness": dict(sorted(self.invasiveness.items())),
                                                    "synced_through": self.synced_through}

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Load an export (any learner kind of this module reads any other's)."""
        data = dict(data)
        inv = data.pop("invasiveness", {}) or {}
        synced = data.pop("synced_through", 0) or 0
        self.evidence.load_json(data)
        self.invasiveness.update({str(k): int(v) for k, v in dict(inv).items()})
        self.synced_through = int(synced)


class ThompsonLearner(ContextualLearner):
    """Thompson sampling: draw each candidate's success probability from its posterior, subtract
    its cost, run the best draw. Explores exactly as much as the evidence leaves in doubt."""

    kind = "thompson"

    def _choose(self, ctx: Context, names: list[str]) -> tuple[str, str]:
        best, best_score = names[0], -math.inf
        for n in names:  # least invasive first: ties (impossible in practice) keep it
            a, b = self.posterior(ctx, n)
            score = self.rng.betavariate(a, b) - self.cost(ctx, n)
            if score > best_score:
                best, best_score = n, score
        return best, f"Thompson draw {best_score:+.2f} (success - cost) was the best"


class UCBLearner(ContextualLearner):
    """Bayes-UCB (Kaufmann, Cappé & Garivier 2012): a candidate's index is the ``1 - 1/(t (ln
    t)^ucb_c)`` quantile of its success posterior minus its cost, ``t`` the evidence in the
    context. The quantile of the Beta posterior is tighter than UCB1's ``sqrt(2 ln N / n)`` bonus
    for success rates near 0 or 1, so clearly worse strategies are left sooner (10 % less regret
    in benchmarks/learner_sim.py)."""

    kind = "ucb"

    def _choose(self, ctx: Context, names: list[str]) -> tuple[str, str]:
        t = 1.0 + sum(max(self.weight(ctx, n), 0.0) for n in names)
        q = max(0.5, 1.0 - 1.0 / (t * max(1.0, math.log(t)) ** self.config.ucb_c))
        best, best_score = names[0], -math.inf
        for n in names:
            a, b = self.posterior(ctx, n)
            score = beta_quantile(q, a, b) - self.cost(ctx, n)
            if score > best_score:
                best, best_score = n, score
        return best, f"upper confidence bound {best_score:+.2f} (success - cost) was the best"
