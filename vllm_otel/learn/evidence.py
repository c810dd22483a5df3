"""What the learners know: discounted success/failure evidence per (context, strategy), the same per
failure type, and the last outcome of each strategy on each target. Exported and imported as
JSON (never pickle): ``Evidence.to_json`` / ``Evidence.from_json``.

Discounting: every outcome of a strategy recorded in a context first multiplies that strategy's
older evidence there by ``discount``, so its last ~1/(1-discount) outcomes carry most of the
weight, and a strategy that stops working loses its lead within a few failures. (Discounting every
strategy of the context instead made rarely chosen bad ones drift back to the prior and be tried
again and again: 20 % more regret in benchmarks/learner_sim.py.) What is never chosen again is
forgotten by time instead, slowly: the learners age each arm's evidence by the time since its last
outcome (``LearnerConfig.half_life_s``) when they read it. The raw attempt and success counts are
kept too, undiscounted, for people and for rule mining.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["Arm", "Evidence", "EvidenceError"]

FORMAT_VERSION = 1


class EvidenceError(ValueError):
    """An exported learner state that cannot be imported; says what is wrong."""


@dataclass
class Arm:
    a: float = 0.0        # discounted successes
    b: float = 0.0        # discounted failures
    dur: float = 0.0      # discounted sum of durations (s)
    attempts: int = 0     # raw counts, never discounted
    successes: int = 0
    last_at: float = 0.0
    recent: list[bool] = field(default_factory=list)  # newest last, at most drop_after long

    @property
    def n(self) -> float:
        return self.a + self.b

    def mean_duration(self) -> float | None:
        return self.dur / self.n if self.n > 1e-9 else None


class _ArmModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: float = Field(ge=0.0)
    b: float = Field(ge=0.0)
    dur: float = Field(0.0, ge=0.0)
    attempts: int = Field(ge=0)
    successes: int = Field(ge=0)
    last_at: float = 0.0
    recent: list[bool] = Field(default_factory=list)


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: list[str] = Field(min_length=1)
    strategy: str = Field(min_length=1)
    arm: _ArmModel


class _Last(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str
    target: str | None
    at: float
    outcome: str


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    kind: str
    contexts: list[_Row]
    families: list[_Row]
    last_on_target: list[_Last] = Field(default_factory=list)
    outcomes_seen: int = 0


class Evidence:
    def __init__(self, discount: float = 1.0, keep_recent: int = 3) -> None:
        self.discount = discount
        self.keep_recent = keep_recent
        self.contexts: dict[tuple[str, ...], dict[str, Arm]] = defaultdict(dict)
        self.families: dict[str, dict[str, Arm]] = defaultdict(dict)
        self.last_on_target: dict[tuple[str, str | None], tuple[float, str]] = {}
        self.outcomes_seen = 0

    def record(self, ctx: tuple[str, ...], strategy: str, success: bool, *, at: float,
               duration_s: float | None, target: str | None, outcome: str) -> None:
        for arms in (self.contexts[ctx], self.families[ctx[0]]):
            arm = arms.setdefault(strategy, Arm())
            arm.a *= self.discount
            arm.b *= self.discount
            arm.dur *= self.discount
            arm.a += 1.0 if success else 0.0
            arm.b += 0.0 if success else 1.0
            arm.dur += max(0.0, duration_s or 0.0)
            arm.attempts += 1
            arm.successes += int(success)
            arm.last_at = max(arm.last_at, at)
            arm.recent = (arm.recent + [success])[-self.keep_recent:]
        self.last_on_target[(strategy, target)] = (at, outcome)
        self.outcomes_seen += 1

    def arm(self, ctx: tuple[str, ...], strategy: str) -> Arm | None:
        arms = self.contexts.get(ctx)
        return None if arms is None else arms.get(strategy)

    def family_arm(self, family: str, strategy: str) -> Arm | None:
        arms = self.families.get(family)
        return None if arms is None else arms.get(strategy)

    # --- JSON -------------------------------------------------------------------------------------

    def to_json(self, kind: str) -> dict[str, Any]:
        def rows(table: Mapping[Any, dict[str, Arm]], as_list: Any) -> list[dict[str, Any]]:
            return [{"context": as_list(k), "strategy": s, "arm": vars(arm).copy()}
                    for k, arms in sorted(table.items()) for s, arm in sorted(arms.items())]

        return {"format": "vllm-otel-learner", "version": FORMAT_VERSION, "kind": kind,
                "contexts": rows(self.contexts, list), "families": rows(self.families, lambda k: [k]),
                "last_on_target": [{"strategy": s, "target": t, "at": at, "outcome": o}
                                   for (s, t), (at, o) in sorted(self.last_on_target.items(),
                                                                 key=lambda kv: (kv[0][0], str(kv[0][1])))],
                "outcomes_seen": self.outcomes_seen}

    def load_json(self, data: Mapping[str, Any]) -> None:
        """Replace what this holds with an export; :class:`EvidenceError` says what is wrong and
        leaves the current state untouched."""
        try:
            st = _State.model_validate(data)
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
            raise EvidenceError(f"not a vllm-otel learner export: {msgs}") from None
        if st.format != "vllm-otel-learner" or st.version != FORMAT_VERSION:
            raise EvidenceError(f"unsupported learner export {st.format!r} version {st.version} "
                                f"(this vllm-otel reads version {FORMAT_VERSION})")
        contexts: dict[tuple[str, ...], dict[str, Arm]] = defaultdict(dict)
        families: dict[str, dict[str, Arm]] = defaultdict(dict)
        for r in st.contexts:
            contexts[tuple(r.context)][r.strategy] = Arm(**r.arm.model_dump())
        for r in st.families:
            families[r.context[0]][r.strategy] = Arm(**r.arm.model_dump())
        self.contexts, self.families = contexts, families
        self.last_on_target = {(x.strategy, x.target): (x.at, x.outcome) for x in st.last_on_target}
        self.outcomes_seen = st.outcomes_seen
