"""Policy (what may be done about which alert, in which mode) and the guards around every action.

The policy is a config file (YAML or JSON), never code: alert name or failure type -> candidate
strategies (the learner picks among them), a mode per strategy, the instances we may touch, and
the guard settings. Loading it binds every strategy's parameters through the registry, so a typo
or a bad value fails at start-up, not when the first alert arrives.

Guards answer from the store (shared by all replicas), so they hold across replicas:
kill switch, target allow-list, stale data, blast radius (these stop everything and may escalate),
mode off / circuit breaker / cooldown / precondition (these remove one candidate), rate limit and
one action per target (these stop the chosen action).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_otel.learn.config import LearnerConfig
from vllm_otel.mitigate.records import (FAILED_OUTCOMES, AlertRecord, GuardDecision, Mode, Target,
                                       describe_validation_error)
from vllm_otel.mitigate.strategies import REGISTRY, Strategy, StrategyConfigError, StrategyRegistry
from vllm_otel.mitigate.store import Store

__all__ = [
    "PolicyConfig", "PolicyError", "Policy", "Rule", "StrategyConfig", "GuardsConfig",
    "RateLimitConfig", "BlastRadiusConfig", "CircuitBreakerConfig", "EscalationConfig",
    "WorkerConfig", "Guardrails", "load_policy", "ESCALATION_REASONS", "ActuatorConfig",
    "ControlConfig", "SupervisorConfig", "HookConfig", "MetricsConfig",
]

ESCALATION_REASONS = ("blast_radius", "stale_data", "circuit_open", "exhausted")


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message names the file and the problems."""


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rule(_Cfg):
    """Which alerts this rule matches, and the strategies to consider for them.

    The first matching rule wins (like Alertmanager routes). ``alertname`` matches the alert's
    name, ``failure_type`` the failure-type label the forecaster sets, ``labels`` every given label.
    """

    alertname: str | None = None
    failure_type: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    strategies: list[str] = Field(default_factory=list,
                                  description="least invasive first; empty: record only, never act")

    @model_validator(mode="after")
    def _some_matcher(self) -> "Rule":
        if not (self.alertname or self.failure_type or self.labels):
            raise ValueError("a rule needs alertname, failure_type or labels to match on")
        return self

    def matches(self, alertname: str, labels: Mapping[str, Any], failure_type_label: str) -> bool:
        if self.alertname is not None and alertname != self.alertname:
            return False
        if self.failure_type is not None and labels.get(failure_type_label) != self.failure_type:
            return False
        return all(labels.get(k) == v for k, v in self.labels.items())


class StrategyConfig(_Cfg):
    mode: Mode | None = Field(None, description="off | dry-run | approval | auto (default: default_mode)")
    params: dict[str, Any] = Field(default_factory=dict)
    cooldown_s: float | None = Field(None, ge=0.0, description="overrides guards.cooldown_s")


class RateLimitConfig(_Cfg):
    max_actions: int = Field(10, ge=1, description="actions started, all targets together ...")
    window_s: float = Field(600.0, gt=0.0, description="... within this window")


class BlastRadiusConfig(_Cfg):
    max_affected_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="stop when more than this fraction of targets has alerts")
    min_affected: int = Field(2, ge=1, description="... and at least this many (a one-instance "
                                                   "fleet is never 'mostly down' by one alert)")
    active_window_s: float = Field(14400.0, gt=0.0,
                                   description="an unresolved alert seen within this counts")
    max_alert_age_s: float | None = Field(
        3600.0, gt=0.0, description="do not act on an alert that started longer ago (stale)")
    max_metrics_age_s: float = Field(120.0, gt=0.0, description="metrics older than this are stale")
    require_metrics: bool = Field(False, description="no metrics for the target: treat as stale")


class CircuitBreakerConfig(_Cfg):
    failures: int = Field(3, ge=1, description="this many executed failures in a row ...")
    window_s: float = Field(3600.0, gt=0.0, description="... within this window open the breaker")
    open_s: float = Field(900.0, gt=0.0, description="then one trial is allowed after this long")


class GuardsConfig(_Cfg):
    cooldown_s: float = Field(300.0, ge=0.0, description="per (strategy, target)")
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    blast_radius: BlastRadiusConfig = Field(default_factory=BlastRadiusConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    target_lease_s: float = Field(900.0, gt=0.0, description="longest one action may hold its target")


class EscalationConfig(_Cfg):
    strategy: str | None = Field("escalate_to_human", description="None: escalations only counted")
    # Not "on": YAML 1.1 reads a bare `on` key as the boolean true.
    when: list[Literal["blast_radius", "stale_data", "circuit_open", "exhausted"]] = Field(
        default_factory=lambda: list(ESCALATION_REASONS))


class WorkerConfig(_Cfg):
    poll_s: float = Field(1.0, gt=0.0, description="look for work (other replicas, approvals)")
    concurrency: int = Field(4, ge=1, description="actions executing (and verifying) at once")
    decide_batch: int = Field(64, ge=1, description="jobs claimed at once and decided together under "
                                                    "one hold of the decision lease (a storm's "
                                                    "jobs: one lease, one guard read per batch)")
    busy_share: float = Field(0.15, gt=0.0, le=1.0,
                              description="while webhooks keep arriving, the worker takes at most this "
                                          "share of the time (one job at a time): the intake's latency "
                                          "against how fast a storm's jobs get done")
    start_hold_s: float = Field(3.0, ge=0.0,
                                description="after start-up, the worker waits while webhooks keep "
                                            "arriving, at most this long: a restarted receiver gets "
                                            "Alertmanager's retries all at once, and they come first")
    verify_delay_s: float = Field(10.0, ge=0.0, description="wait before verifying an action")
    action_timeout_s: float = Field(60.0, gt=0.0)
    max_attempts: int = Field(3, ge=1, description="a job picked up this often is given up")
    precondition_rechecks: int = Field(
        8, ge=0, description="no candidate's precondition holds (the pressure eased for a moment) "
                             "while the alert still fires: look again this many times ...")
    precondition_recheck_s: float = Field(15.0, gt=0.0, description="... this far apart")
    lease_s: float = Field(300.0, gt=0.0, description="a job's runner must finish within this")
    learner_history_s: float = Field(7 * 86400.0, gt=0.0, description="outcomes replayed at start")

    @model_validator(mode="after")
    def _lease_covers_action(self) -> "WorkerConfig":
        # A runner that outlives its lease would see its job taken over mid-action.
        need = 2 * self.action_timeout_s + self.verify_delay_s
        if self.lease_s <= need:
            raise ValueError(f"lease_s ({self.lease_s}) must exceed 2*action_timeout_s + "
                             f"verify_delay_s ({need})")
        return self


# --- how actions reach vLLM (read by vllm_otel.mitigate.actuators) ----------------------------------

class ControlConfig(_Cfg):
    """vLLM's live control endpoints (``POST <target>/monitoring/control/<action>``)."""

    token_file: Path | None = Field(
        None, description="file holding the bearer token vLLM was started with "
                          "(VLLM_OTEL_CONTROL_TOKEN_FILE); read at each call, never stored")
    timeout_s: float = Field(30.0, gt=0.0, le=600.0)
    scheme: Literal["http", "https"] = Field("http", description="for targets without a url")


class SupervisorConfig(_Cfg):
    """Where restarts of one target go: a ``vllm-otel supervise`` (http), docker compose, or a
    Kubernetes Deployment. All three sit behind vllm_otel.mitigate.supervisor.base.RestartBackend."""

    kind: Literal["http", "compose", "kubernetes"] = "http"
    # http: the supervisor's API
    url: str | None = Field(None, description="http: base URL of `vllm-otel supervise --listen`")
    token_file: Path | None = Field(None, description="http: the supervisor's bearer token file")
    timeout_s: float = Field(900.0, gt=0.0, description="longest one restart call may take")
    # compose
    project_dir: Path | None = Field(None, description="compose: directory of the compose project")
    files: list[str] = Field(default_factory=list, description="compose: -f files, in order")
    service: str | None = Field(None, description="compose: the vLLM service")
    override_file: Path | None = Field(None, description="compose: where changed args are written")
    # kubernetes
    namespace: str | None = None
    deployment: str | None = None
    container: str | None = Field(None, description="kubernetes: container name (default: the first)")
    context: str | None = Field(None, description="kubernetes: kubeconfig context")
    # compose and kubernetes: drain through the target's control endpoints, then check health
    health_url: str | None = Field(None, description="compose: URL that answers 200 when vLLM is up")

    @model_validator(mode="after")
    def _complete(self) -> "SupervisorConfig":
        need = {"http": ("url",), "compose": ("project_dir", "service"),
                "kubernetes": ("namespace", "deployment")}[self.kind]
        missing = [n for n in need if getattr(self, n) in (None, "")]
        if missing:
            raise ValueError(f"a {self.kind} supervisor needs {', '.join(missing)}")
        return self


class HookConfig(_Cfg):
    """An external HTTP call (load balancer, autoscaler, pager). Nothing is ever executed locally.

    ``url``, header values and string leaves of ``body`` are templates: ``${instance}``,
    ``${alertname}``, ``${target_url}`` and the calling strategy's parameters (e.g.
    ``${replicas_delta}``) are substituted; a string that is exactly ``${name}`` keeps the value's
    JSON type. Values substituted into the URL are percent-encoded.
    """

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    header_files: dict[str, Path] = Field(
        default_factory=dict, description="header name -> file holding its (secret) value")
    token_file: Path | None = Field(None, description="sends Authorization: Bearer <file content>")
    body: Any = Field(None, description="JSON body template (GET/DELETE: none)")
    timeout_s: float = Field(10.0, gt=0.0, le=300.0)

    @model_validator(mode="after")
    def _http_url(self) -> "HookConfig":
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("hook url must start with http:// or https://")
        return self


class ActuatorConfig(_Cfg):
    control: ControlConfig = Field(default_factory=ControlConfig)
    supervisors: dict[str, SupervisorConfig] = Field(
        default_factory=dict, description="target instance -> where its restarts go")
    hooks: dict[str, HookConfig] = Field(default_factory=dict, description="name -> external call")


class MetricsConfig(_Cfg):
    """Where strategies read a target's metrics: Prometheus, else the target's own /metrics."""

    prometheus_url: str | None = Field(None, description="None: scrape <target>/metrics directly")
    selector: str = Field("", description='extra label matchers for Prometheus, e.g. job="vllm"')
    instance_label: str = "instance"
    token_file: Path | None = Field(None, description="bearer token for Prometheus")
    timeout_s: float = Field(5.0, gt=0.0, le=60.0)


class PolicyConfig(_Cfg):
    version: Literal[1] = 1
    target_label: str = Field("instance", description="alert label naming the instance")
    failure_type_label: str = "failure_type"
    targets: list[Target] = Field(default_factory=list, description="the only instances we touch")
    kill_switch: bool = Field(False, description="true: do nothing at all")
    default_mode: Mode = Mode.DRY_RUN
    rules: list[Rule] = Field(default_factory=list)
    strategies: dict[str, StrategyConfig] = Field(default_factory=dict)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    store_url: str | None = Field(None, description="SQLAlchemy URL; --db-url wins")
    actuator: ActuatorConfig = Field(default_factory=ActuatorConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig,
                                   description="which learner chooses among the candidates, and how")

    @model_validator(mode="after")
    def _unique_targets(self) -> "PolicyConfig":
        seen = [t.instance for t in self.targets]
        dupes = sorted({i for i in seen if seen.count(i) > 1})
        if dupes:
            raise ValueError(f"targets listed twice: {dupes}")
        need = 2 * self.worker.action_timeout_s + self.worker.verify_delay_s
        if self.guards.target_lease_s <= need:
            # A lease that ends mid-action would let a second action onto the same target.
            raise ValueError(f"guards.target_lease_s ({self.guards.target_lease_s}) must exceed "
                             f"2*worker.action_timeout_s + worker.verify_delay_s ({need})")
        return self


class Policy:
    """A validated policy bound to strategy instances (params checked here, once)."""

    def __init__(self, config: PolicyConfig, registry: StrategyRegistry = REGISTRY,
                 source: str = "<policy>") -> None:
        self.config = config
        self.registry = registry
        self.source = source
        self._targets = {t.instance: t for t in config.targets}
        problems: list[str] = []
        names: set[str] = set(config.strategies)
        for r in config.rules:
            names.update(r.strategies)
        if config.escalation.strategy:
            names.add(config.escalation.strategy)
        self._strategies: dict[str, Strategy] = {}
        for name in sorted(names):
            cfg = config.strategies.get(name, StrategyConfig())
            try:
                self._strategies[name] = registry.create(name, cfg.params)
            except StrategyConfigError as e:
                problems.append(str(e))
                continue
            # A strategy that calls an external hook needs it defined: caught here, not at 3 a.m.
            for hook in getattr(self._strategies[name], "required_hooks", lambda: ())():
                if hook not in config.actuator.hooks:
                    problems.append(f"strategy {name!r} calls hook {hook!r}, which actuator.hooks "
                                    "does not define")
        if problems:
            raise PolicyError(f"{source}: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], registry: StrategyRegistry = REGISTRY,
                     source: str = "<policy>") -> "Policy":
        try:
            cfg = PolicyConfig.model_validate(dict(data))
        except ValidationError as e:
            raise PolicyError(f"{source}: {describe_validation_error(e, limit=10)}") from None
        return cls(cfg, registry, source)

    @classmethod
    def load(cls, path: str | Path, registry: StrategyRegistry = REGISTRY) -> "Policy":
        return load_policy(path, registry)

    # --- lookups ------------------------------------------------------------------------------------

    def rule_for(self, alertname: str, labels: Mapping[str, Any]) -> Rule | None:
        for r in self.config.rules:
            if r.matches(alertname, labels, self.config.failure_type_label):
                return r
        return None

    def candidates(self, alertname: str, labels: Mapping[str, Any]) -> list[str] | None:
        """The strategies for an alert in policy order; None when no rule matches (unmapped)."""
        r = self.rule_for(alertname, labels)
        return None if r is None else list(r.strategies)

    def strategy(self, name: str) -> Strategy:
        return self._strategies[name]

    def strategy_names(self) -> list[str]:
        return sorted(self._strategies)

    def rebind(self, name: str) -> bool:
        """Re-create strategy ``name`` from the registry with its configured params (a strategy
        plugin was reloaded); False when the policy does not use it. Raises StrategyConfigError."""
        if name not in self._strategies:
            return False
        cfg = self.config.strategies.get(name, StrategyConfig())
        self._strategies[name] = self.registry.create(name, cfg.params)
        return True

    def mode(self, name: str) -> Mode:
        cfg = self.config.strategies.get(name)
        return (cfg.mode if cfg and cfg.mode else None) or self.config.default_mode

    def cooldown_s(self, name: str) -> float:
        cfg = self.config.strategies.get(name)
        return cfg.cooldown_s if cfg and cfg.cooldown_s is not None else self.config.guards.cooldown_s

    def target(self, instance: str | None) -> Target | None:
        return None if instance is None else self._targets.get(instance)

    @property
    def targets(self) -> list[Target]:
        return list(self.config.targets)

    @property
    def escalation_strategy(self) -> str | None:
        return self.config.escalation.strategy


def load_policy(path: str | Path, registry: StrategyRegistry = REGISTRY) -> Policy:
    """Read a YAML (or JSON) policy file; :class:`PolicyError` names the file and the problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PolicyError(f"{p}: cannot read: {e}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise PolicyError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PolicyError(f"{p}: the top level must be a mapping")
    return Policy.from_mapping(data, registry, source=str(p))


# --- guards -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CircuitState:
    open: bool
    detail: str


class Guardrails:
    """Each guard as a small question to the store; the answers go into the audit trail."""

    def __init__(self, policy: Policy, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock
        self._memo = threading.local()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Within the block, on this thread, the answers that no decision of the batch changes
        are read once: which targets have active alerts (blast radius: only the intake changes
        it) and each strategy's circuit (only a finished action changes it, and actions finish
        outside the decision lease). What a decision records (a start: rate limit, cooldown,
        target lease) is read afresh by the next one."""
        self._memo.cache = {}
        try:
            yield
        finally:
            self._memo.cache = None

    def _cached(self, key: Any, read: Callable[[], Any]) -> Any:
        cache = getattr(self._memo, "cache", None)
        if cache is None:
            return read()
        if key not in cache:
            cache[key] = read()
        return cache[key]

    @property
    def cfg(self) -> GuardsConfig:
        return self.policy.config.guards

    # --- stop everything ------------------------------------------------------------------------------

    def kill_switch(self) -> GuardDecision:
        if self.policy.config.kill_switch:
            return GuardDecision(guard="kill_switch", ok=False, detail="engaged in the policy file")
        ks = self.store.kill_switch()
        if ks.engaged:
            return GuardDecision(guard="kill_switch", ok=False,
                                 detail=f"engaged via API by {ks.by or 'unknown'}: {ks.reason}")
        return GuardDecision(guard="kill_switch", ok=True)

    def target_allowed(self, instance: str | None) -> GuardDecision:
        if self.policy.target(instance) is not None:
            return GuardDecision(guard="target_allowed", ok=True, detail=str(instance))
        return GuardDecision(guard="target_allowed", ok=False,
                             detail=f"instance {instance!r} is not a configured target")

    def alert_fresh(self, alert: AlertRecord) -> GuardDecision:
        max_age = self.cfg.blast_radius.max_alert_age_s
        age = self.clock() - alert.starts_at
        if max_age is not None and age > max_age:
            return GuardDecision(guard="stale_data", ok=False,
                                 detail=f"alert started {age:.0f} s ago (> {max_age:.0f} s)")
        return GuardDecision(guard="stale_data", ok=True, detail=f"alert age {age:.0f} s")

    def metrics_fresh(self, metrics_at: float | None, have_source: bool) -> GuardDecision:
        br = self.cfg.blast_radius
        if metrics_at is None:
            if br.require_metrics:
                why = "no metrics for the target" if have_source else "no metrics source configured"
                return GuardDecision(guard="stale_data", ok=False, detail=why)
            return GuardDecision(guard="stale_data", ok=True, detail="metrics not required")
        age = self.clock() - metrics_at
        if age > br.max_metrics_age_s:
            return GuardDecision(guard="stale_data", ok=False,
                                 detail=f"metrics are {age:.0f} s old (> {br.max_metrics_age_s:.0f} s)")
        return GuardDecision(guard="stale_data", ok=True, detail=f"metrics age {age:.0f} s")

    def blast_radius(self) -> GuardDecision:
        br = self.cfg.blast_radius
        fleet = {t.instance for t in self.policy.targets}
        if not fleet:
            return GuardDecision(guard="blast_radius", ok=True, detail="no fleet configured")
        affected = self._cached("active", lambda: self.store.active_instances(
            self.clock() - br.active_window_s)) & fleet
        frac = len(affected) / len(fleet)
        detail = f"{len(affected)}/{len(fleet)} targets have active alerts"
        if len(affected) >= br.min_affected and frac > br.max_affected_fraction:
            return GuardDecision(guard="blast_radius", ok=False,
                                 detail=f"{detail} (> {br.max_affected_fraction:.0%}): "
                                        "too much of the fleet is affected to act automatically")
        return GuardDecision(guard="blast_radius", ok=True, detail=detail)

    # --- remove one candidate ---------------------------------------------------------------------------

    def mode_allows(self, strategy: str) -> GuardDecision:
        mode = self.policy.mode(strategy)
        return GuardDecision(guard="mode", ok=mode is not Mode.OFF, detail=mode.value, strategy=strategy)

    def circuit(self, strategy: str) -> CircuitState:
        """Open after ``failures`` executed failures in a row within ``window_s``; half-open (one
        trial allowed) once ``open_s`` has passed since the last of them."""
        cb = self.cfg.circuit_breaker
        now = self.clock()
        last = self._cached(("executed", strategy), lambda: self.store.executed_outcomes(
            strategy, since=now - cb.window_s, limit=cb.failures))
        if len(last) < cb.failures or not all(o.outcome in FAILED_OUTCOMES for o in last):
            return CircuitState(False, f"closed ({len(last)} recent executions)")
        since_last = now - last[0].at
        if since_last >= cb.open_s:
            return CircuitState(False, f"half-open: {cb.failures} failures, last {since_last:.0f} s ago")
        return CircuitState(True, f"open: {cb.failures} failures in a row, last {since_last:.0f} s ago "
                                  f"(trial allowed after {cb.open_s:.0f} s)")

    def circuit_guard(self, strategy: str) -> GuardDecision:
        st = self.circuit(strategy)
        return GuardDecision(guard="circuit_breaker", ok=not st.open, detail=st.detail, strategy=strategy)

    def cooldown(self, strategy: str, target: str | None) -> GuardDecision:
        cd = self.policy.cooldown_s(strategy)
        last = self.store.last_start(strategy, target)
        if last is not None and self.clock() - last < cd:
            left = cd - (self.clock() - last)
            return GuardDecision(guard="cooldown", ok=False, strategy=strategy,
                                 detail=f"ran on {target} {self.clock() - last:.0f} s ago; {left:.0f} s left")
        return GuardDecision(guard="cooldown", ok=True, strategy=strategy, detail=f"{cd:.0f} s")

    # --- stop the chosen action ----------------------------------------------------------------------------

    def rate_limit(self) -> GuardDecision:
        rl = self.cfg.rate_limit
        # Strategies that touch nothing (notifications) are not what the limit protects against.
        harmless = [n for n in self.policy.strategy_names() if self.policy.strategy(n).invasiveness == 0]
        n = self.store.starts_since(self.clock() - rl.window_s, exclude_strategies=harmless)
        detail = f"{n} actions in the last {rl.window_s:.0f} s (max {rl.max_actions})"
        return GuardDecision(guard="rate_limit", ok=n < rl.max_actions, detail=detail)

    def acquire_target(self, target: str, owner: str) -> GuardDecision:
        """One action per target at a time: a lease in the store, released when the action ends."""
        got = self.store.acquire_lock(self.target_lock(target), owner, self.cfg.target_lease_s,
                                      now=self.clock())
        if got:
            return GuardDecision(guard="one_per_target", ok=True, detail=f"{target} is ours")
        holder = self.store.lock_holder(self.target_lock(target), now=self.clock())
        return GuardDecision(guard="one_per_target", ok=False,
                             detail=f"another action is running on {target} ({holder})")

    @staticmethod
    def target_lock(target: str) -> str:
        return f"target:{target}"

    def release_target(self, target: str, owner: str) -> None:
        self.store.release_lock(self.target_lock(target), owner)


def first_failure(decisions: Sequence[GuardDecision]) -> GuardDecision | None:
    return next((d for d in decisions if not d.ok), None)
