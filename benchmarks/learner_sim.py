"""Regret of the learners on a simulated fleet: which mitigation do they choose, and how much worse
than an oracle that knows the hidden success probabilities?

The simulation: incidents minutes apart (exponential gaps, mean ``--gap-min``) on six instances,
four failure types with four candidate strategies each (names and invasiveness of the built-in
strategies), each incident critical or warning and with the KV cache above or below 90 %. Each
(failure type, KV bucket, strategy) has a hidden success probability (critical: 0.1 lower);
durations are noisy (log-normal); 5 % of verifications misread the outcome. A strategy's true
reward is its success probability minus its disruption and time cost (the learner's default
``learner.reward``). Halfway (``--drift-at``), in "queue_overload at KV >= 0.9", the best strategy
stops working and another takes its place. The learners' clock follows the simulation.

Compared: every learner kind (``make_learner``), random, epsilon-greedy (0.1) on the same contexts
(Sutton & Barto's: sample averages from 0, ties at random), a fixed rule per failure type (the
strategy best on average before the drift, as an expert would configure it), and
``oracle_safety_rules``: it knows the hidden probabilities but obeys the default learner's safety
rules, so its regret is what those rules alone cost. Regret: the oracle's expected reward minus the
chosen strategy's, summed over incidents (choosing nothing scores 0, like escalating). The oracle
is per incident (failure type, KV bucket, severity) and follows the drift. Every learner meets
the same incidents, and each incident carries its own random draws for its outcome, so two
learners choosing the same strategy for it see the same outcome (a paired comparison).

``--breakdown`` splits each learner's regret by phase (cold start: the first 20 incidents of each
failure type and KV bucket; steady; post-drift: the drifted situation from the drift on) and, for
the contextual learners, names the safety rule that kept the oracle's choice out, if one did.

    python benchmarks/learner_sim.py                 # 5 seeds, 1,000 incidents
    python benchmarks/learner_sim.py --seeds 10 --breakdown
    python benchmarks/learner_sim.py --seeds 10 --json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_otel.learn import LearnerConfig, UCBLearner, make_learner  # noqa: E402
from vllm_otel.learn.context import Context, context_of  # noqa: E402

INVASIVENESS = {"reduce_batch_size": 10, "lower_queue_limits": 14, "enable_backpressure": 16,
                "reset_prefix_cache": 25, "emergency_gpu_memory_cleanup": 28, "handle_timeouts": 40,
                "abort_longest_requests": 45, "pause_and_resume": 55, "restart_engine": 75,
                "reduce_gpu_memory_utilization": 80, "rebalance_load": 90}
DURATION_S = {"reduce_batch_size": 30, "lower_queue_limits": 20, "enable_backpressure": 20,
              "reset_prefix_cache": 5, "emergency_gpu_memory_cleanup": 20, "handle_timeouts": 15,
              "abort_longest_requests": 10, "pause_and_resume": 40, "restart_engine": 150,
              "reduce_gpu_memory_utilization": 200, "rebalance_load": 60}
# failure type -> (share of incidents, P(KV >= 0.9), {strategy: (p at KV < 0.9, p at KV >= 0.9)})
FAILURES: dict[str, tuple[float, float, dict[str, tuple[float, float]]]] = {
    "kv_cache_exhaustion": (0.3, 0.7, {"reduce_batch_size": (0.55, 0.35), "lower_queue_limits": (0.5, 0.45),
                                       "reset_prefix_cache": (0.85, 0.4), "restart_engine": (0.9, 0.9)}),
    "queue_overload": (0.3, 0.5, {"lower_queue_limits": (0.6, 0.9), "enable_backpressure": (0.85, 0.5),
                                  "abort_longest_requests": (0.5, 0.6), "rebalance_load": (0.9, 0.85)}),
    "engine_stall": (0.2, 0.3, {"handle_timeouts": (0.3, 0.3), "abort_longest_requests": (0.45, 0.4),
                                "pause_and_resume": (0.8, 0.75), "restart_engine": (0.95, 0.95)}),
    "memory_exhaustion": (0.2, 0.5, {"reduce_batch_size": (0.6, 0.25), "emergency_gpu_memory_cleanup": (0.4, 0.8),
                                     "restart_engine": (0.7, 0.7), "reduce_gpu_memory_utilization": (0.9, 0.9)}),
}
DRIFT = ("queue_overload", True, {"lower_queue_limits": 0.15, "enable_backpressure": 0.95})
TARGETS = [f"10.0.0.{i}:8000" for i in range(1, 7)]
MISREAD = 0.05
CRITICAL_SHARE, CRITICAL_PENALTY = 0.25, 0.1


@dataclass
class Incident:
    at: float
    failure: str
    kv_high: bool
    critical: bool
    target: str
    kv: float
    # The incident's own random numbers for its outcome: whichever learner acts on it, the same
    # draws decide (common random numbers: a paired comparison, not luck of the outcome stream).
    u_ok: float = 0.0
    u_misread: float = 0.0
    z_duration: float = 0.0
    u_kind: float = 0.0


class World:
    def __init__(self, seed: int, gap_min: float, drift_at: int) -> None:
        self.rng = random.Random(seed)
        self.gap_s = gap_min * 60.0
        self.drift_at = drift_at
        self.reward_cfg = LearnerConfig().reward
        self.now = 1.7e9
        self.n = 0

    def p(self, inc: Incident, s: str) -> float:
        base = FAILURES[inc.failure][2][s][int(inc.kv_high)]
        if self.n >= self.drift_at and (inc.failure, inc.kv_high) == DRIFT[:2] and s in DRIFT[2]:
            base = DRIFT[2][s]
        return max(0.0, base - (CRITICAL_PENALTY if inc.critical else 0.0))

    def cost(self, s: str) -> float:
        r = self.reward_cfg
        return r.disruption_of(s, INVASIVENESS[s]) + r.time_cost(DURATION_S[s])

    def reward(self, inc: Incident, s: str | None) -> float:
        return 0.0 if s is None else self.p(inc, s) - self.cost(s)

    def best(self, inc: Incident) -> tuple[str | None, float]:
        s = max(FAILURES[inc.failure][2], key=lambda s: self.reward(inc, s))
        return (s, self.reward(inc, s)) if self.reward(inc, s) > 0 else (None, 0.0)

    def incidents(self) -> list[Incident]:
        out = []
        names, weights = list(FAILURES), [f[0] for f in FAILURES.values()]
        for _ in range(10_000):
            self.now += self.rng.expovariate(1.0 / self.gap_s)
            f = self.rng.choices(names, weights)[0]
            hi = self.rng.random() < FAILURES[f][1]
            kv = self.rng.uniform(0.9, 1.0) if hi else self.rng.uniform(0.3, 0.9)
            out.append(Incident(self.now, f, hi, self.rng.random() < CRITICAL_SHARE,
                                self.rng.choice(TARGETS), kv, self.rng.random(), self.rng.random(),
                                self.rng.gauss(0.0, 0.3), self.rng.random()))
        return out

    def outcome(self, inc: Incident, s: str) -> tuple[str, float]:
        ok = inc.u_ok < self.p(inc, s)
        if inc.u_misread < MISREAD:
            ok = not ok
        dur = DURATION_S[s] * math.exp(inc.z_duration)
        return ("success" if ok else ("no_effect" if inc.u_kind < 0.5 else "failure")), dur


@dataclass
class Cand:
    name: str
    invasiveness: int


class EpsilonGreedy:
    """Textbook epsilon-greedy on the learner's contexts: explores 10 %, else the best mean reward."""

    def __init__(self, eps: float, seed: int, cost: Callable[[str], float]) -> None:
        self.eps, self.rng, self.cost = eps, random.Random(seed), cost
        self.q: dict[tuple[Any, str], list[float]] = {}
        self.cfg = LearnerConfig().context

    def select_best_strategy(self, state: Any, errors: Any, metrics: Any, cands: list[Cand]) -> tuple[str, float]:
        ctx = context_of(state, metrics, self.cfg)
        if self.rng.random() < self.eps:
            return self.rng.choice(cands).name, 0.0
        # Sutton & Barto's: sample-average values starting at 0, ties broken at random.
        q = {c.name: (self.q[(ctx, c.name)][0] / self.q[(ctx, c.name)][1]
                      if (ctx, c.name) in self.q else 0.0) for c in cands}
        top = max(q.values())
        return self.rng.choice([n for n, v in q.items() if v == top]), 0.0

    def record_outcome(self, state: Any, errors: Any, metrics: Any, strategy: str, outcome: str,
                       *, duration_s: float | None = None, **_: Any) -> None:
        ctx = context_of(state, metrics, self.cfg)
        r = (outcome == "success") - self.cost(strategy)
        t = self.q.setdefault((ctx, strategy), [0.0, 0])
        t[0] += r
        t[1] += 1


class RandomChoice:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def select_best_strategy(self, state: Any, errors: Any, metrics: Any, cands: list[Cand]) -> tuple[str, float]:
        return self.rng.choice(cands).name, 0.0

    def record_outcome(self, *a: Any, **k: Any) -> None:
        pass


class FixedRule:
    """One strategy per failure type: the best on average before the drift (an expert's mapping)."""

    def __init__(self, world: World) -> None:
        self.choice = {}
        for f, (_, p_hi, table) in FAILURES.items():
            def avg(s: str) -> float:
                return sum(w * (table[s][hi] - CRITICAL_SHARE * CRITICAL_PENALTY)
                           for hi, w in ((0, 1 - p_hi), (1, p_hi))) - world.cost(s)
            self.choice[f] = max(table, key=avg)

    def select_best_strategy(self, state: Any, errors: Any, metrics: Any, cands: list[Cand]) -> tuple[str, float]:
        return self.choice[state["failure_type"]], 0.0

    def record_outcome(self, *a: Any, **k: Any) -> None:
        pass


class SafetyRulesOracle(UCBLearner):
    """Not a learner: it knows the incident's hidden success probabilities and costs, and chooses
    the best strategy the learner's safety rules leave (retry on a target, dropped in a context,
    no riskier exploration on critical alerts). Its regret prices those rules."""

    def __init__(self, world: World, config: LearnerConfig, clock: Callable[[], float]) -> None:
        super().__init__(config, clock=clock)
        self.world = world
        self.incident: Incident | None = None

    def posterior(self, ctx: Context, strategy: str) -> tuple[float, float]:
        assert self.incident is not None
        p = min(max(self.world.p(self.incident, strategy), 1e-6), 1 - 1e-6)
        return 1e6 * p, 1e6 * (1 - p)

    def weight(self, ctx: Context, strategy: str) -> float:
        return 1e6

    def cost(self, ctx: Context, strategy: str) -> float:
        return self.world.cost(strategy)

    def _choose(self, ctx: Context, names: list[str]) -> tuple[str, str]:
        assert self.incident is not None
        inc = self.incident
        return max(names, key=lambda n: self.world.reward(inc, n)), "the oracle's best allowed"


LEARNERS = ["thompson", "ucb", "rules", "rule_based", "epsilon_greedy_0.1", "random", "fixed_rule",
            "oracle_safety_rules"]
COLD = 20  # incidents of a (failure type, KV bucket) situation counted as its cold start


def build(kind: str, world: World, seed: int, overrides: dict[str, Any] | None = None) -> Any:
    if kind == "epsilon_greedy_0.1":
        return EpsilonGreedy(0.1, seed, world.cost)
    if kind == "random":
        return RandomChoice(seed)
    if kind == "fixed_rule":
        return FixedRule(world)
    if kind == "oracle_safety_rules":
        return SafetyRulesOracle(world, LearnerConfig.model_validate({**(overrides or {}), "seed": seed}),
                                 clock=lambda: world.now)
    return make_learner({**(overrides or {}), "kind": kind, "seed": seed}, clock=lambda: world.now)


def safety_rule_in_the_way(learner: Any, state: dict[str, Any], metrics: dict[str, float],
                           cands: list[Cand], best: str | None, now: float) -> str | None:
    """Which safety rule (if any) left the oracle's choice out of the learner's candidates."""
    if best is None or not hasattr(learner, "allowed"):
        return None
    names = [c.name for c in sorted(cands, key=lambda c: c.invasiveness)]
    left, notes = learner.allowed(learner.context(state, metrics), state, names, now)
    if best in left:
        return None
    note = next((x for x in notes if best in x), "")
    for key, rule in (("on this target", "retry_on_target"), ("in a row", "dropped"),
                      ("critical", "critical"), ("worth", "not_worth_trying")):
        if key in note:
            return rule
    return "other"


def run(kind: str, seed: int, n: int, gap_min: float, drift_at: int,
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    world = World(seed, gap_min, drift_at)
    incidents = world.incidents()[:n]
    learner = build(kind, world, seed + 1000, overrides)
    regret, marks, drift_choices = 0.0, {}, []
    seen: dict[tuple[str, bool], int] = {}
    phases = {"cold": 0.0, "steady": 0.0, "post_drift": 0.0}
    causes: dict[str, float] = {}
    for i, inc in enumerate(incidents):
        world.n, world.now = i, inc.at
        state = {"alertname": "VllmFailureForecast", "failure_type": inc.failure, "target": inc.target,
                 "severity": "critical" if inc.critical else "warning", "labels": {}}
        metrics = {"up": 1.0, "kv_cache_usage": inc.kv}
        cands = [Cand(s, INVASIVENESS[s]) for s in FAILURES[inc.failure][2]]
        if isinstance(learner, SafetyRulesOracle):
            learner.incident = inc
        chosen, _ = learner.select_best_strategy(state, [], metrics, cands)
        best, best_r = world.best(inc)
        r = best_r - world.reward(inc, chosen)
        regret += r
        key = (inc.failure, inc.kv_high)
        seen[key] = seen.get(key, 0) + 1
        drifted = i >= drift_at and key == DRIFT[:2]
        phases["post_drift" if drifted else "cold" if seen[key] <= COLD else "steady"] += r
        if r > 1e-12:
            rule = safety_rule_in_the_way(learner, state, metrics, cands, best, world.now) or "choice"
            causes[rule] = causes.get(rule, 0.0) + r
        if drifted:
            drift_choices.append(chosen == best)
        if chosen is not None:
            outcome, dur = world.outcome(inc, chosen)
            world.now = inc.at + dur
            learner.record_outcome(state, [], metrics, chosen, outcome, duration_s=dur, at=world.now)
        if i + 1 in (200, n):
            marks[i + 1] = regret
    # Back on the new best: the first window of 10 incidents of the drifted context with 8 on it.
    recovered = next((j + 10 for j in range(len(drift_choices) - 9) if sum(drift_choices[j:j + 10]) >= 8),
                     None)
    return {"regret": marks, "recovered_after": recovered, "phases": phases, "causes": causes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="worlds to average over (seeds 0..N-1)")
    ap.add_argument("--first-seed", type=int, default=0, help="tune on other seeds than you report")
    ap.add_argument("--incidents", type=int, default=1000)
    ap.add_argument("--drift-at", type=int, default=500)
    ap.add_argument("--gap-min", type=float, default=12.0, help="mean minutes between incidents")
    ap.add_argument("--learners", default=",".join(LEARNERS), help="comma-separated: " + ",".join(LEARNERS))
    ap.add_argument("--config", default="{}", help="learner: settings (JSON) for the learner kinds")
    ap.add_argument("--breakdown", action="store_true",
                    help="also regret by phase and by the safety rule in the oracle's way")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    kinds = a.learners.split(",")
    unknown = [k for k in kinds if k not in LEARNERS]
    if unknown:
        ap.error(f"unknown learner(s) {', '.join(unknown)}; choose from {', '.join(LEARNERS)}")
    try:
        over = json.loads(a.config)
        LearnerConfig.model_validate({**over, "kind": "ucb"})
    except ValidationError as e:
        ap.error("--config: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
    except ValueError as e:
        ap.error(f"--config: not JSON ({e})")
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    res = {k: [run(k, s, a.incidents, a.gap_min, a.drift_at, over) for s in seeds] for k in kinds}
    n = a.incidents
    eg_runs = res.get("epsilon_greedy_0.1")
    summary = {}
    for k, runs in res.items():
        rn = [r["regret"][n] for r in runs]
        summary[k] = {
            "regret_200": statistics.mean(r["regret"][200] for r in runs), "regret_n": statistics.mean(rn),
            "regret_n_sd": statistics.pstdev(rn), "regret_n_per_seed": [round(x, 2) for x in rn],
            "recovered_after": [r["recovered_after"] for r in runs],
            "phases": {p: statistics.mean(r["phases"][p] for r in runs) for p in runs[0]["phases"]},
            "causes": {c: sum(r["causes"].get(c, 0.0) for r in runs) / len(runs)
                       for c in sorted({c for r in runs for c in r["causes"]})}}
        if eg_runs:
            summary[k]["paired_ratio_per_seed"] = [round(x / e["regret"][n], 3) if e["regret"][n] else None
                                                   for x, e in zip(rn, eg_runs)]
    eg = summary.get("epsilon_greedy_0.1", {}).get("regret_n")
    if a.json:
        print(json.dumps({"incidents": n, "seeds": list(seeds), "drift_at": a.drift_at, "learners": summary}))
        return 0
    print(f"{a.seeds} seeds from {a.first_seed}, {n} incidents ~{a.gap_min:g} min apart, "
          f"drift at incident {a.drift_at}")
    print(f"{'learner':<20} {'regret@200':>11} {f'regret@{n}':>13} {'vs eps-greedy':>14}  "
          "back on the new best after (incidents of that context, per seed)")
    for k, s in summary.items():
        ratio = f"{s['regret_n'] / eg:.2f}" if eg else "-"
        rec = ", ".join("never" if x is None else str(x) for x in s["recovered_after"])
        print(f"{k:<20} {s['regret_200']:>11.1f} {s['regret_n']:>8.1f} ±{s['regret_n_sd']:<4.0f} "
              f"{ratio:>14}  {rec}")
    if a.breakdown:
        print(f"\nregret@{n} by phase (cold: first {COLD} incidents of each situation) and by what kept "
              "the oracle's choice out")
        print(f"{'learner':<20} {'cold':>6} {'steady':>7} {'post-drift':>11}   {'choice':>7} "
              f"{'retry_on_target':>16} {'dropped':>8} {'critical':>9} {'not_worth':>10}   "
              "paired ratio per seed")
        for k, s in summary.items():
            ph, c = s["phases"], s["causes"]
            pr = " ".join(f"{x:.2f}" for x in s.get("paired_ratio_per_seed", []) if x is not None)
            print(f"{k:<20} {ph['cold']:>6.1f} {ph['steady']:>7.1f} {ph['post_drift']:>11.1f}   "
                  f"{c.get('choice', 0):>7.1f} {c.get('retry_on_target', 0):>16.1f} "
                  f"{c.get('dropped', 0):>8.1f} "
                  f"{c.get('critical', 0):>9.1f} {c.get('not_worth_trying', 0):>10.1f}   {pr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
