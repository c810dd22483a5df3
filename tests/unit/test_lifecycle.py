"""LifecycleTracker: transitions, validation, listeners, redacted checkpoints, metrics, spans."""

from __future__ import annotations

import json
import logging
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from vllm_otel.instrument import lifecycle as lc
from vllm_otel.instrument.lifecycle import (
    END_STATES,
    INTERVENTION_STATES,
    SERVING_STATES,
    SPAN_EVENT_NAME,
    STARTUP_ORDER,
    STARTUP_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    LifecycleCollector,
    LifecycleState,
    LifecycleTracker,
    is_valid_transition,
    span_event_listener,
    validate_transitions,
)
from vllm_otel.redact import REDACTED

S = LifecycleState
HF = "hf_abcdefghijklmnopqrstuvwxyz123456"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_states_and_groups_partition_everything() -> None:
    groups = [STARTUP_STATES, SERVING_STATES, INTERVENTION_STATES, END_STATES]
    assert set().union(*groups) == set(S)
    assert sum(len(g) for g in groups) == len(S) == 19
    assert all(s.value == s.name.lower() for s in S)
    assert f"{S.READY}" == "ready" and S("serving") is S.SERVING


def test_transition_table_is_sane_and_validator_can_fail() -> None:
    assert validate_transitions(TRANSITIONS) == []
    broken = dict(TRANSITIONS)
    del broken[S.WAKING]
    broken[S.IDLE] = frozenset({S.IDLE})  # self-loop; IDLE can no longer reach stopped
    problems = validate_transitions(broken)
    assert "no entry for waking" in problems
    assert "self-loop on idle" in problems
    assert "idle cannot reach stopped" in problems


@pytest.mark.parametrize("src, dst, ok", [
    (S.INITIALIZING, S.CONFIGURING, True),
    (S.INITIALIZING, S.MODEL_LOADING, True),  # skipped phases are fine
    (S.MODEL_LOADING, S.CONFIGURING, False),  # start-up never goes back
    (S.WEIGHTS_LOADING, S.CRASHED, True),
    (S.KV_CACHE_ALLOCATION, S.SHUTTING_DOWN, True),
    (S.READY, S.IDLE, True),
    (S.IDLE, S.SATURATED, True),
    (S.STALLED, S.SERVING, True),
    (S.SERVING, S.DRAINING, True),
    (S.DRAINING, S.PAUSED, True),  # drained
    (S.PAUSED, S.IDLE, True),  # resumed
    (S.CRASHED, S.SHUTTING_DOWN, True),
    (S.STOPPED, S.CRASHED, False),
    (S.SLEEPING, S.WAKING, True),
    (S.SLEEPING, S.SERVING, False),  # must wake first
    (S.WAKING, S.IDLE, True),
    (S.SHUTTING_DOWN, S.STOPPED, True),
    (S.STOPPED, S.SERVING, False),
    (S.SERVING, S.MODEL_LOADING, False),
    ("serving", "crashed", True),
])
def test_transition_rules(src: S | str, dst: S | str, ok: bool) -> None:
    assert is_valid_transition(src, dst) is ok


def test_anything_may_crash() -> None:
    assert all(S.CRASHED in TRANSITIONS[s] for s in S if s not in TERMINAL_STATES)


def test_a_transition_keeps_the_time_of_its_signal(clock: FakeClock) -> None:
    tr = LifecycleTracker(clock=clock, started_at=900.0)
    assert tr.since == 900.0
    t = tr.transition(S.CONFIGURING, at=950.0)
    assert t is not None and t.timestamp == 950.0 and t.duration_s == 50.0
    late = tr.transition(S.MODEL_LOADING, at=940.0)  # an older record: history stays ordered
    assert late is not None and late.timestamp == 950.0 and late.duration_s == 0.0
    assert tr.transition(S.READY).timestamp == clock.t


def test_startup_path_history_and_time_in_state(clock: FakeClock) -> None:
    tr = LifecycleTracker(clock=clock)
    assert tr.state is S.INITIALIZING and tr.since == 1000.0
    for state in STARTUP_ORDER[1:] + (S.IDLE, S.SERVING):
        clock.tick(2.0)
        t = tr.transition(state, reason=f"enter {state}")
        assert t is not None and t.valid and t.to_state is state and t.duration_s == 2.0
    clock.tick(5.0)
    hist = tr.history()
    assert [t.to_state for t in hist] == list(STARTUP_ORDER[1:]) + [S.IDLE, S.SERVING]
    assert [t.seq for t in hist] == list(range(1, len(hist) + 1))
    assert all(a.to_state is b.from_state for a, b in zip(hist, hist[1:]))
    assert tr.state is S.SERVING and tr.since == clock.t - 5.0
    times = tr.time_in_state()
    assert times["initializing"] == 2.0 and times["serving"] == 5.0
    assert sum(times.values()) == pytest.approx(clock.t - 1000.0)
    assert tr.invalid_transitions == {}


def test_same_state_is_a_noop_and_names_are_coerced(clock: FakeClock) -> None:
    tr = LifecycleTracker(clock=clock)
    calls = []
    tr.add_listener(calls.append)
    tr.transition(" READY ")
    assert tr.state is S.READY
    t = tr.transition("ready", reason="again")
    assert t is not None and t.from_state is t.to_state is S.READY
    assert len(tr.history()) == 1 and len(calls) == 1


def test_unknown_state_is_counted_not_raised(
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    tr = LifecycleTracker(clock=clock)
    with caplog.at_level(logging.WARNING, logger=lc.__name__):
        assert tr.transition("exploded") is None
        assert tr.transition(object()) is None
    assert tr.state is S.INITIALIZING and tr.history() == []
    assert tr.errors["unknown_state"] == 2
    assert len([r for r in caplog.records if "unknown_state" in r.getMessage()]) == 1


def test_invalid_transition_applied_counted_and_logged_once(
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    tr = LifecycleTracker(clock=clock)
    tr.transition(S.READY)
    tr.transition(S.SERVING)
    with caplog.at_level(logging.WARNING, logger=lc.__name__):
        t = tr.transition(S.MODEL_LOADING, reason="reload")
        tr.transition(S.READY)
        tr.transition(S.SERVING)
        tr.transition(S.MODEL_LOADING)
    assert t is not None and t.valid is False
    assert tr.state is S.MODEL_LOADING  # the tracker follows reality
    assert tr.invalid_transitions == {("serving", "model_loading"): 2}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "serving -> model_loading" in warnings[0].getMessage()


def test_listener_errors_do_not_propagate(
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    tr = LifecycleTracker(clock=clock)
    seen: list[str] = []

    def bad(t: lc.Transition) -> None:
        raise RuntimeError("listener bug")

    tr.add_listener(bad)
    tr.add_listener(lambda t: seen.append(t.to_state.value))
    with caplog.at_level(logging.WARNING, logger=lc.__name__):
        assert tr.transition(S.READY) is not None
        assert tr.transition(S.IDLE) is not None
    assert seen == ["ready", "idle"]  # later listeners still run
    assert tr.errors["listener"] == 2
    assert sum("listener" in r.getMessage() for r in caplog.records) == 1
    tr.remove_listener(bad)
    tr.transition(S.SERVING)
    assert tr.errors["listener"] == 2 and seen[-1] == "serving"


def test_internal_failure_is_swallowed(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = LifecycleTracker(clock=clock)

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("redaction bug")

    monkeypatch.setattr(lc, "redact_mapping", boom)
    assert tr.transition(S.READY, detail="x") is None
    assert tr.checkpoint("after") is None
    assert tr.errors == {"transition": 1, "checkpoint": 1}
    assert tr.state is S.INITIALIZING
    json.loads(tr.to_json())  # still serialisable


def test_track_startup_redacts_secrets(clock: FakeClock) -> None:
    torch_before = "torch" in sys.modules
    vllm_before = "vllm" in sys.modules
    tr = LifecycleTracker(clock=clock)
    env = {"HF_TOKEN": HF, "OPENAI_API_KEY": "sk-local", "VLLM_HOST_IP": "10.0.0.5",
           "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer xyz987"}
    args = {"model": "gpt2", "api_key": "argsecret", "max_num_batched_tokens": 2048,
            "served_model_name": [f"gpt2 ({HF})"]}
    cp = tr.track_startup(arguments=args, environment=env, hardware_info=None)
    assert cp is not None and cp.label == "startup" and cp.state is S.INITIALIZING
    dumped = tr.to_json()
    for secret in (HF, "sk-local", "argsecret", "xyz987"):
        assert secret not in dumped, secret
    data = json.loads(dumped)["checkpoints"][0]["data"]
    assert data["environment"]["HF_TOKEN"] == REDACTED
    assert data["environment"]["VLLM_HOST_IP"] == "10.0.0.5"
    assert data["arguments"]["max_num_batched_tokens"] == 2048
    hw = data["hardware_info"]
    assert hw["cpu_count"] >= 1 and hw["memory_total_bytes"] > 0 and hw["python_version"]
    assert ("torch" in sys.modules) == torch_before and ("vllm" in sys.modules) == vllm_before
    assert env["HF_TOKEN"] == HF  # caller's dict untouched


def test_track_startup_argv_and_explicit_hardware(clock: FakeClock) -> None:
    tr = LifecycleTracker(clock=clock)
    cp = tr.track_startup(["vllm", "serve", "gpt2", "--hf-token", "plain"], {}, {"gpus": 4})
    assert cp is not None
    assert cp.data["arguments"] == ["vllm", "serve", "gpt2", "--hf-token", REDACTED]
    assert cp.data["hardware_info"] == {"gpus": 4}


def test_checkpoints_bounded_but_startup_kept(clock: FakeClock) -> None:
    tr = LifecycleTracker(clock=clock, max_checkpoints=3, history_size=5)
    tr.track_startup({"model": "gpt2"}, {}, {})
    for i in range(10):
        clock.tick(1)
        tr.checkpoint(f"c{i}", token=HF, step=i)
    labels = [c.label for c in tr.checkpoints()]
    assert labels == ["startup", "c7", "c8", "c9"]
    assert tr.checkpoints()[-1].data == {"token": REDACTED, "step": 9}
    for s in [S.READY, S.IDLE, S.SERVING] * 3:
        tr.transition(s)
    assert len(tr.history()) == 5 and tr.history()[-1].seq == 9
    d = tr.to_dict()
    assert d["state"] == "serving" and len(d["history"]) == 5
    assert {"from_state": "idle", "to_state": "serving", "count": 3} in d["transition_counts"]
    assert HF not in tr.to_json()


def _sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, {"instance": "node1:8000", "engine": "0", **labels})


def test_prometheus_exposition(clock: FakeClock) -> None:
    reg = CollectorRegistry()
    tr = LifecycleTracker(instance="node1:8000", engine_index=0, registry=reg, clock=clock)
    assert _sample(reg, "vllm_otel_lifecycle_state", state="initializing") == 1.0
    for s in S:  # every state is a series, so absent() and state-change queries work
        assert _sample(reg, "vllm_otel_lifecycle_state", state=s.value) is not None
    clock.tick(3)
    tr.transition(S.READY)
    tr.transition(S.SERVING)
    clock.tick(4)
    tr.transition(S.CONFIGURING)  # invalid
    assert _sample(reg, "vllm_otel_lifecycle_state", state="configuring") == 1.0
    assert _sample(reg, "vllm_otel_lifecycle_state", state="initializing") == 0.0
    assert sum(_sample(reg, "vllm_otel_lifecycle_state", state=s.value) for s in S) == 1.0
    assert _sample(reg, "vllm_otel_lifecycle_state_since_timestamp_seconds") == 1007.0
    assert _sample(reg, "vllm_otel_lifecycle_transitions_total",
                   from_state="initializing", to_state="ready") == 1.0
    assert _sample(reg, "vllm_otel_lifecycle_invalid_transitions_total",
                   from_state="serving", to_state="configuring") == 1.0
    assert _sample(reg, "vllm_otel_lifecycle_invalid_transitions_total",
                   from_state="initializing", to_state="ready") is None
    assert _sample(reg, "vllm_otel_lifecycle_state_seconds_total", state="serving") == 4.0
    text = generate_latest(reg).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"vllm_otel_lifecycle_state", "vllm_otel_lifecycle_transitions",
            "vllm_otel_lifecycle_invalid_transitions"} <= names


def test_engines_share_a_registry_and_restarts_replace(clock: FakeClock) -> None:
    reg = CollectorRegistry()
    a = LifecycleTracker(instance="h", engine_index=0, registry=reg, clock=clock)
    LifecycleTracker(instance="h", engine_index=1, registry=reg, clock=clock).transition(S.READY)
    get = lambda e, s: reg.get_sample_value(  # noqa: E731
        "vllm_otel_lifecycle_state", {"instance": "h", "engine": e, "state": s})
    assert get("0", "initializing") == 1.0 and get("1", "ready") == 1.0
    restarted = LifecycleTracker(instance="h", engine_index=0, registry=reg, clock=clock)
    restarted.transition(S.CRASHED)
    assert get("0", "crashed") == 1.0
    text = generate_latest(reg).decode()
    assert text.count('vllm_otel_lifecycle_state{engine="0",instance="h",state="crashed"}') == 1
    a.close()  # an old tracker closing must not remove its replacement
    assert get("0", "crashed") == 1.0
    restarted.close()
    assert get("0", "crashed") is None and get("1", "ready") == 1.0


def test_registration_conflict_and_broken_collect_do_not_raise(
        clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    class Foreign:
        def collect(self):  # type: ignore[no-untyped-def]
            return [GaugeMetricFamily("vllm_otel_lifecycle_state", "someone else", value=1)]

        describe = collect  # lets the registry see the name clash at register time

    reg = CollectorRegistry()
    reg.register(Foreign())  # type: ignore[arg-type]
    tr = LifecycleTracker(registry=reg, clock=clock)
    assert tr.errors == {"register": 1}

    collector = LifecycleCollector(tr)
    monkeypatch.setattr(tr, "_snapshot", lambda: 1 / 0)
    assert collector.collect() == []


def test_thread_safety_smoke() -> None:
    reg = CollectorRegistry()
    tr = LifecycleTracker(instance="t", registry=reg, history_size=100_000)
    cycle = [S.READY, S.IDLE, S.SERVING, S.SATURATED, S.PREEMPTING, S.PAUSED]
    results: list[lc.Transition | None] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(offset: int) -> None:
        start.wait()
        local = []
        for i in range(400):
            local.append(tr.transition(cycle[(i + offset) % len(cycle)]))
            if i % 50 == 0:
                tr.to_dict()
                generate_latest(reg)
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch often, so a missing lock shows as a broken chain
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    recorded = [r for r in results if r is not None and r.from_state is not r.to_state]
    hist = tr.history()
    assert tr.errors == {}
    assert len(hist) == len(recorded) == hist[-1].seq
    assert sorted(r.seq for r in recorded) == list(range(1, len(recorded) + 1))
    # The chain is unbroken only if every transition read and wrote the state atomically.
    assert all(a.to_state is b.from_state for a, b in zip(hist, hist[1:]))
    assert hist[-1].to_state is tr.state
    assert sum(_counts(reg).values()) == len(recorded)


def _counts(reg: CollectorRegistry) -> dict[tuple[str, str], float]:
    out = {}
    for fam in reg.collect():
        if fam.name == "vllm_otel_lifecycle_transitions":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["from_state"], s.labels["to_state"])] = s.value
    return out


@pytest.fixture
def spans():  # type: ignore[no-untyped-def]
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_span_events_on_current_span(spans: tuple, clock: FakeClock) -> None:
    tracer, exporter = spans
    tr = LifecycleTracker(clock=clock)
    tr.add_listener(span_event_listener())
    tr.transition(S.READY)  # no current span, no tracer: nothing to attach to, no error
    with tracer.start_as_current_span("startup"):
        tr.transition(S.IDLE, reason=f"warm with {HF}", batch=4)
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == SPAN_EVENT_NAME
    assert event.attributes["vllm_otel.lifecycle.from"] == "ready"
    assert event.attributes["vllm_otel.lifecycle.to"] == "idle"
    assert event.attributes["vllm_otel.lifecycle.reason"] == f"warm with {REDACTED}"
    assert event.attributes["vllm_otel.lifecycle.detail.batch"] == 4
    assert tr.errors == {}


def test_span_listener_with_tracer_and_attach_span(spans: tuple, clock: FakeClock) -> None:
    tracer, exporter = spans
    tr = LifecycleTracker(clock=clock)
    tr.add_listener(span_event_listener(tracer))
    tr.transition(S.READY)  # outside any span: a zero-length span carries it
    (standalone,) = exporter.get_finished_spans()
    assert standalone.name == SPAN_EVENT_NAME
    assert standalone.attributes["vllm_otel.lifecycle.to"] == "ready"

    long_span = tracer.start_span("engine")
    tr2 = LifecycleTracker(clock=clock)
    tr2.attach_span(long_span)
    tr2.transition(S.MODEL_LOADING)
    long_span.end()
    tr2.transition(S.READY)  # span no longer recording: ignored, no error
    engine = [s for s in exporter.get_finished_spans() if s.name == "engine"][0]
    assert [e.attributes["vllm_otel.lifecycle.to"] for e in engine.events] == ["model_loading"]
    assert tr2.errors == {}


def test_locks_are_renewed_after_fork(clock: FakeClock) -> None:
    tr = LifecycleTracker(clock=clock)
    old = tr._lock
    old.acquire()  # as if another thread held it when vLLM forked
    try:
        lc._after_fork_in_child()
        assert tr._lock is not old
        assert tr.transition(S.READY) is not None
    finally:
        old.release()
