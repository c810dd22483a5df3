"""The strategy interface, the registry, and the two boundaries strategies act through.

A strategy is one small, named action on the system (Robusta's model): typed parameters, a
docstring that says what it does to the system, an ``invasiveness`` rank (least invasive runs
first), a precondition, the action, and a verification. Strategies never talk to vLLM directly:
they go through an :class:`Actuator` (control endpoints, supervisor), so the same strategy runs
against a real vLLM, and tests record what crosses that boundary. They read metrics through a
:class:`MetricsSource` (Prometheus, or vLLM's own /metrics).

Parameters are validated when a policy binds them (:meth:`StrategyRegistry.create`, called for
every configured strategy when the policy loads), never when an alert arrives.
"""

from __future__ import annotations

import abc
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_otel.mitigate.records import AlertRecord, Mode, Target, describe_validation_error

__all__ = [
    "Strategy", "StrategyParams", "NoParams", "StrategyRegistry", "REGISTRY", "register_strategy",
    "StrategyContext", "ActionResult", "Verification", "Check", "Actuator", "ActuatorError",
    "UnavailableActuator", "MetricsSource", "MetricsSnapshot", "StrategyConfigError",
]


class StrategyConfigError(ValueError):
    """A strategy class or its parameters are invalid (raised at registration / policy load)."""


class ActuatorError(RuntimeError):
    """The actuator could not do what was asked; the strategy's outcome is a failure."""


class StrategyParams(BaseModel):
    """Base of every strategy's parameters: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(StrategyParams):
    pass


class ActionResult(BaseModel):
    """What the action did. ``ok=False`` is a failed action (never retried blindly)."""

    ok: bool
    detail: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class Verification(BaseModel):
    """Whether the action had the intended effect, judged after it ran."""

    ok: bool
    detail: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class MetricsSnapshot(BaseModel):
    """Metric values for one target and when they were measured (unix seconds)."""

    values: dict[str, float] = Field(default_factory=dict)
    at: float


@dataclass(frozen=True)
class Check:
    """A precondition's answer. Falsy when it does not hold; ``reason`` says why either way."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@runtime_checkable
class Actuator(Protocol):
    """Does things to a vLLM instance. The real one calls vLLM's control endpoints / supervisor.

    ``action`` is a verb the actuator knows ("reset_prefix_cache", "sleep", ...); ``params`` are
    JSON-able. Returns the response data; raises :class:`ActuatorError` when it could not act.
    """

    async def call(self, target: Target, action: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        ...


@runtime_checkable
class MetricsSource(Protocol):
    """Current metric values of a target; None when they cannot be read (counts as stale data)."""

    async def snapshot(self, target: Target) -> MetricsSnapshot | None:
        ...


class UnavailableActuator:
    """Stand-in when no actuator is installed: every call fails loudly, nothing is touched."""

    def __init__(self, why: str = "no actuator configured") -> None:
        self.why = why

    async def call(self, target: Target, action: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        raise ActuatorError(f"cannot {action} on {target.instance}: {self.why}")


@dataclass
class StrategyContext:
    """Everything a strategy may look at. Built by the receiver for one decision."""

    alert: AlertRecord
    target: Target | None
    mode: Mode
    why: str = ""
    state: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_at: float | None = None
    metrics_source: MetricsSource | None = None
    action_id: int | None = None
    # Filled in as the action proceeds:
    result: ActionResult | None = None
    metrics_after: dict[str, float] | None = None

    async def fresh_metrics(self) -> dict[str, float] | None:
        """Read the target's metrics now (verification); None when unavailable."""
        if self.metrics_source is None or self.target is None:
            return None
        snap = await self.metrics_source.snapshot(self.target)
        return None if snap is None else dict(snap.values)


class Strategy(abc.ABC):
    """One mitigation. Subclass, set ``name``, ``invasiveness``, ``Params``; write a docstring
    that says what it does to the system; register with :func:`register_strategy`."""

    name: ClassVar[str]
    # 0: touches nothing (notify); ~10: reversible tuning; ~50: drops work; ~90: restarts.
    invasiveness: ClassVar[int]
    Params: ClassVar[type[StrategyParams]] = NoParams
    # False for strategies that do not act on one instance (escalation): no target needed.
    needs_target: ClassVar[bool] = True

    def __init__(self, params: StrategyParams | Mapping[str, Any] | None = None) -> None:
        if isinstance(params, self.Params):
            self.params = params
        else:
            try:
                self.params = self.Params.model_validate(dict(params or {}))
            except ValidationError as e:
                raise StrategyConfigError(
                    f"strategy {self.name!r}: bad params: {describe_validation_error(e)}") from None

    @classmethod
    def summary(cls) -> str:
        return (inspect.getdoc(cls) or "").strip().splitlines()[0]

    def applies(self, ctx: StrategyContext) -> Check | bool:
        """Precondition, from the context alone (no I/O). Default: applies to any alert."""
        if self.needs_target and ctx.target is None:
            return Check(False, "needs a target instance")
        return Check(True)

    @abc.abstractmethod
    async def execute(self, ctx: StrategyContext, actuator: Actuator) -> ActionResult:
        """Do it. Raise or return ``ok=False`` on failure."""

    @abc.abstractmethod
    async def verify(self, ctx: StrategyContext) -> Verification:
        """Did it work? ``ctx.result`` and ``ctx.metrics_after`` are filled in."""


_NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")


class StrategyRegistry:
    """Strategy classes by name. Registration checks the class, so a broken one fails at import."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Strategy]] = {}

    def register(self, cls: type[Strategy]) -> type[Strategy]:
        problems = []
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"name {name!r} must be snake_case (2-64 chars)")
        if not (inspect.getdoc(cls) or "").strip() or cls.__doc__ is None:
            problems.append("needs a docstring saying what it does to the system")
        inv = getattr(cls, "invasiveness", None)
        if not isinstance(inv, int) or isinstance(inv, bool) or not 0 <= inv <= 100:
            problems.append(f"invasiveness {inv!r} must be an int in 0..100")
        params = getattr(cls, "Params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            problems.append("Params must be a pydantic model (subclass StrategyParams)")
        elif params.model_config.get("extra") != "forbid":
            problems.append("Params must forbid unknown fields (subclass StrategyParams)")
        for meth in ("execute", "verify"):
            if not inspect.iscoroutinefunction(getattr(cls, meth, None)):
                problems.append(f"{meth} must be async")
        if inspect.iscoroutinefunction(getattr(cls, "applies", None)):
            problems.append("applies must be a plain function (no I/O in preconditions)")
        if inspect.isabstract(cls):
            problems.append("has abstract methods left")
        if isinstance(name, str) and name in self._classes and self._classes[name] is not cls:
            problems.append(f"name {name!r} already registered by {self._classes[name].__qualname__}")
        if problems:
            raise StrategyConfigError(f"cannot register {cls.__qualname__}: " + "; ".join(problems))
        self._classes[name] = cls  # type: ignore[index]
        return cls

    def unregister(self, name: str) -> type[Strategy] | None:
        """Remove a strategy (a plugin file deleted or about to be replaced by its new version)."""
        return self._classes.pop(name, None)

    def get(self, name: str) -> type[Strategy]:
        try:
            return self._classes[name]
        except KeyError:
            raise StrategyConfigError(f"unknown strategy {name!r}; known: {', '.join(self.names())}") from None

    def create(self, name: str, params: Mapping[str, Any] | None = None) -> Strategy:
        """An instance with validated params; :class:`StrategyConfigError` says what is wrong."""
        return self.get(name)(params)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __len__(self) -> int:
        return len(self._classes)

    def copy(self) -> "StrategyRegistry":
        new = StrategyRegistry()
        new._classes = dict(self._classes)
        return new

    def describe(self) -> list[dict[str, Any]]:
        """Name, rank, summary and parameter schema of every strategy (docs, ``--help``)."""
        return [{"name": n, "invasiveness": c.invasiveness, "summary": c.summary(),
                 "needs_target": c.needs_target, "params": c.Params.model_json_schema()}
                for n, c in sorted(self._classes.items(), key=lambda kv: (kv[1].invasiveness, kv[0]))]


REGISTRY = StrategyRegistry()


def register_strategy(name_or_cls: str | type[Strategy],
                      strategy: type[Strategy] | Strategy | None = None) -> type[Strategy]:
    """Add a strategy to the default registry; policies can then name it.

    ``@register_strategy`` on a class registers it under its ``name``.
    ``register_strategy("my_strategy", MyStrategy)`` or ``register_strategy("my_strategy",
    MyStrategy(params))`` registers it under ``my_strategy`` (an instance's parameters become the
    defaults a policy may override). The same checks apply either way."""
    if strategy is None:
        if not isinstance(name_or_cls, type):
            raise StrategyConfigError("register_strategy(name, strategy) needs the strategy")
        return REGISTRY.register(name_or_cls)
    if not isinstance(name_or_cls, str):
        raise StrategyConfigError(f"register_strategy: the name must be a string, not {name_or_cls!r}")
    base = strategy if isinstance(strategy, type) else type(strategy)
    if not (isinstance(base, type) and issubclass(base, Strategy)):
        raise StrategyConfigError(f"cannot register {strategy!r}: not a Strategy subclass or instance")
    attrs: dict[str, Any] = {"name": name_or_cls, "__doc__": base.__doc__,
                             "__module__": base.__module__}
    if not isinstance(strategy, type):
        defaults = strategy.params.model_dump()

        def __init__(self: Strategy, params: StrategyParams | Mapping[str, Any] | None = None) -> None:
            if params is None or isinstance(params, Mapping):
                params = {**defaults, **dict(params or {})}
            base.__init__(self, params)

        attrs["__init__"] = __init__
    cls = type(base.__name__, (base,), attrs)
    return REGISTRY.register(cls)
