"""What the demo shows while it runs: one poll a second of Prometheus, the receiver, the
supervisor and the OTLP receiver, kept as the latest :class:`Snapshot` for the terminal view.

Every value shown comes from the running services (Prometheus' answers, the receiver's audit
trail and learner, the supervisor's status), never from what the scenario intended. A service
that does not answer leaves its part of the snapshot empty and the error in ``errors``; the
poll goes on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from vllm_otel.demo.summary import learner_attempts

__all__ = ["Snapshot", "Observer", "PREDICTED_TYPES"]

# The failure types the demo's policy acts on before they happen (demo_policy's failure_type rules).
PREDICTED_TYPES = ("queue_overload", "ttft_slo_breach", "kv_cache_exhaustion")


@dataclass
class Snapshot:
    at: float = 0.0
    phase: str = "starting"
    rate: float = 0.0
    lifecycle: str | None = None
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    stalled: float | None = None
    probability: dict[str, float] = field(default_factory=dict)      # failure type -> P
    time_to_failure: dict[str, float] = field(default_factory=dict)  # failure type -> s
    alerts: list[str] = field(default_factory=list)                  # firing in Prometheus
    actions: list[dict[str, Any]] = field(default_factory=list)      # the receiver's audit trail
    learner: dict[str, Any] | None = None
    vllm_pid: int | None = None
    requests_ok: int = 0
    requests_failed: int = 0
    spans: int = 0
    metric_points: int = 0
    errors: dict[str, str] = field(default_factory=dict)


def _one(result: list[dict[str, Any]]) -> float | None:
    try:
        return float(result[0]["value"][1]) if result else None
    except (KeyError, IndexError, ValueError):
        return None


class Observer:
    """Polls in a daemon thread; :attr:`latest` is replaced whole each time (no torn reads)."""

    def __init__(self, stack: Any, load: Any = None, period_s: float = 1.0) -> None:
        self.stack = stack
        self.load = load
        self.period_s = period_s
        self.latest = Snapshot()
        self.phase = "starting"
        # strategy -> when GET /learner first counted an outcome of it (the learner step's time)
        self.learner_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-observer", daemon=True)

    def start(self) -> "Observer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # an interrupt can come before it ever started
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.latest = self.poll()
            except Exception as e:  # noqa: BLE001 - the view must keep going whatever one poll meets
                self.latest.errors["observer"] = f"{type(e).__name__}: {e}"
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - t0)))

    def poll(self) -> Snapshot:
        st = self.stack
        snap = Snapshot(at=time.time(), phase=self.phase, rate=getattr(self.load, "rate", 0.0))
        if st.prom is not None:
            self._prometheus(snap)
        try:
            snap.actions = st.receiver_get("/actions", limit=20)["actions"]
            snap.learner = self.poll_learner(snap.actions)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            snap.errors["receiver"] = type(e).__name__
        try:
            snap.vllm_pid = st.vllm_pid()
        except (httpx.HTTPError, ValueError, KeyError) as e:
            snap.errors["supervisor"] = type(e).__name__
        if self.load is not None:
            results = self.load.snapshot()
            snap.requests_ok = sum(1 for _, r in results if r.ok)
            snap.requests_failed = len(results) - snap.requests_ok
        if st.otlp is not None:
            snap.spans = st.otlp.accepted_count("traces")
            snap.metric_points = st.otlp.accepted_count("metrics")
        return snap

    def poll_learner(self, actions: list[dict[str, Any]] | None = None) -> Any:
        """GET /learner; note the first time it counts an outcome of each strategy that ran."""
        learner = self.stack.receiver_get("/learner")
        now = time.time()
        for a in actions if actions is not None else self.latest.actions:
            name = a.get("strategy")
            if name and a.get("outcome") and name not in self.learner_seen and learner_attempts(learner, name) > 0:
                self.learner_seen[name] = now
        return learner

    def _prometheus(self, snap: Snapshot) -> None:
        prom, sel = self.stack.prom, 'job="vllm"'
        try:
            snap.running = _one(prom.query(f"sum(vllm:num_requests_running{{{sel}}})"))
            snap.waiting = _one(prom.query(f"sum(vllm:num_requests_waiting{{{sel}}})"))
            snap.kv_usage = _one(prom.query(f"max(vllm:kv_cache_usage_perc{{{sel}}})"))
            snap.stalled = _one(prom.query(f"max(vllm_otel_engine_stalled{{{sel}}})"))
            state = prom.query(f"vllm_otel_lifecycle_state{{{sel}}} == 1")
            snap.lifecycle = state[0]["metric"].get("state") if state else None
            for item in prom.query('max by (failure_type) (vllm_otel_failure_probability{job="vllm-otel-forecaster"})'):
                snap.probability[item["metric"]["failure_type"]] = float(item["value"][1])
            for item in prom.query('min by (failure_type) (vllm_otel_time_to_failure_seconds{job="vllm-otel-forecaster"})'):
                snap.time_to_failure[item["metric"]["failure_type"]] = float(item["value"][1])
            snap.alerts = sorted({a["labels"]["alertname"] + (f"[{a['labels']['failure_type']}]"
                                                              if "failure_type" in a["labels"] else "")
                                  for a in prom.alerts() if a.get("state") == "firing"})
        except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
            snap.errors["prometheus"] = type(e).__name__
