"""The demo's story, driven for real: calm, an overload ramp, then a stalled engine.

1. ``probe``: the server's capacity (requests per second with every slot busy, nothing queued),
   so the ramp has the same shape on a fast or a busy machine; the forecaster sees it too and
   learns the service time at a full batch from it.
2. ``calm``: 0.3 x capacity, while the forecaster gathers history.
3. ``ramp``: the arrival rate climbs from 0.5 x to ``peak`` x capacity in ``ramp_s`` (and on at the
   same pace, should the probe have underestimated the capacity). The forecaster should
   see the overload coming; its alert reaches the receiver, which lowers vLLM's admission limits.
   The ramp holds until that action has an outcome (then a few seconds more, to show the effect),
   or until ``ramp_max_s``.
4. ``recover``: back to calm.
5. ``stall``: with requests in flight, the engine-core process is frozen (SIGSTOP, the way a hung
   GPU kernel looks: ``/health`` still 200). The watchdog sees no progress, the stall alert fires,
   the receiver restarts vLLM through the supervisor; the phase ends once a request succeeds
   on the new server.

The scenario only drives load and the one fault; everything reported about what followed is
read from the services (see :mod:`vllm_otel.demo.summary`). ``deadline`` (monotonic) bounds it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from vllm_otel.demo.load import LoadDriver, probe_capacity
from vllm_otel.demo.observe import Observer
from vllm_otel.demo.stack import DemoStack
from vllm_otel.demo.summary import action_time, is_predictive
from vllm_otel.testing.processes import ProcessFailed, engine_core_process

__all__ = ["Plan", "Timeline", "Scenario", "DeadlineReached"]


class DeadlineReached(RuntimeError):
    """``--duration`` ran out; the summary says which steps did not happen."""


@dataclass
class Plan:
    calm_s: float = 25.0
    ramp_s: float = 100.0
    ramp_max_s: float = 140.0
    peak: float = 1.5
    calm: float = 0.3
    ramp_from: float = 0.5
    after_action_s: float = 10.0
    recover_s: float = 8.0
    stall: bool = True
    stall_wait_s: float = 240.0


@dataclass
class Timeline:
    """When each phase ran and what the scenario itself did (unix seconds)."""

    started_at: float = field(default_factory=time.time)
    capacity_rps: float | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    sigstop_at: float | None = None
    frozen_pid: int | None = None
    old_vllm_pid: int | None = None
    ended_at: float | None = None

    def begin(self, name: str, rate: float | None = None) -> None:
        now = time.time()
        if self.phases and self.phases[-1].get("end") is None:
            self.phases[-1]["end"] = now
        self.phases.append({"phase": name, "start": now, "end": None, "rate_from": rate})

    def finish(self) -> None:
        self.ended_at = time.time()
        if self.phases and self.phases[-1].get("end") is None:
            self.phases[-1]["end"] = self.ended_at

    def phase(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.phases if p["phase"] == name), None)


class Scenario:
    def __init__(self, stack: DemoStack, requests: list[Any], plan: Plan, observer: Observer,
                 deadline: float, step: Callable[[str], None]) -> None:
        self.stack, self.plan, self.obs, self.deadline, self.step = stack, plan, observer, deadline, step
        assert stack.vllm is not None
        self.requests = requests
        self.load = LoadDriver(stack.vllm.url, requests)
        observer.load = self.load
        self.timeline = Timeline()

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineReached("the --duration ran out")
        return left

    def _sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self._left())))

    def _phase(self, name: str, rate: float | None = None) -> None:
        self.timeline.begin(name, rate)
        self.obs.phase = name

    def run(self) -> Timeline:
        try:
            self.stack.start_monitoring()
            self._probe()
            self.load.start()
            self._calm("calm", self.plan.calm_s)
            self._ramp()
            self._calm("recover", self.plan.recover_s)
            if self.plan.stall:
                self._stall()
        finally:
            self.load.stop()
            self.timeline.finish()
        return self.timeline

    # ---- phases ----------------------------------------------------------------------------

    def _probe(self) -> None:
        s = self.stack.s
        self._phase("probe")
        cap = probe_capacity(self.stack.vllm.url, self.requests[:500], concurrency=s.max_num_seqs, seconds=12)
        if cap <= 0:
            raise ProcessFailed("vLLM completed no request in the capacity probe")
        self.timeline.capacity_rps = cap
        self.step(f"capacity: {cap:.1f} requests/s with all {s.max_num_seqs} slots busy")

    def _calm(self, name: str, seconds: float) -> None:
        cap = self.timeline.capacity_rps or 1.0
        self.load.rate = self.plan.calm * cap
        self._phase(name, self.load.rate)
        self.step(f"{name}: {self.load.rate:.1f} requests/s for {seconds:.0f} s")
        self._sleep(seconds)

    def _ramp(self) -> None:
        p, cap = self.plan, self.timeline.capacity_rps or 1.0
        self._phase("ramp", p.ramp_from * cap)
        self.step(f"ramp: {p.ramp_from * cap:.1f} -> {p.peak * cap:.1f} requests/s over {p.ramp_s:.0f} s")
        start = time.monotonic()
        t_wall = time.time()
        done_at: float | None = None
        while True:
            el = time.monotonic() - start
            # Past ``peak`` the rate keeps climbing at the same pace: on a busy machine the probe
            # can underestimate the capacity, and a ramp that stops below it shows nothing.
            self.load.rate = cap * (p.ramp_from + (p.peak - p.ramp_from) * el / p.ramp_s)
            act = _first_action(self.obs.latest.actions, since=t_wall, predictive=True)
            if done_at is None and act is not None and act.get("outcome"):
                done_at = time.monotonic()
                self.step(f"{act['strategy']} finished: {act['outcome']} ({act.get('detail') or ''})")
            if done_at is not None and time.monotonic() - done_at >= p.after_action_s:
                return
            if el >= p.ramp_max_s:
                self.step("ramp ended without a verified predictive action")
                return
            self._sleep(0.5)

    def _stall(self) -> None:
        cap = self.timeline.capacity_rps or 1.0
        self.load.rate = self.plan.calm * cap
        self._phase("stall", self.load.rate)
        old = self.stack.vllm_pid()
        self.timeline.old_vllm_pid = old
        if old is None:
            raise ProcessFailed("the supervisor reports no vLLM process")
        # Freeze it with work in flight, as a real hang would (an idle frozen engine is no stall).
        t_end = time.monotonic() + 20
        while (self.obs.latest.running or 0) < 1 and time.monotonic() < t_end:
            self._sleep(0.2)
        core = engine_core_process(old)
        os.kill(core.pid, signal.SIGSTOP)
        self.stack.frozen_pid = core.pid
        self.timeline.sigstop_at, self.timeline.frozen_pid = time.time(), core.pid
        self.step(f"stall: engine core pid {core.pid} frozen (SIGSTOP) with requests in flight")
        wait_until = time.monotonic() + self.plan.stall_wait_s
        restarted_at: float | None = None
        while time.monotonic() < wait_until:
            pid = self.obs.latest.vllm_pid
            if restarted_at is None and pid is not None and pid != old:
                restarted_at = time.time()
                self.stack.frozen_pid = None  # gone with the old server
                self.step(f"vLLM restarted by the supervisor (pid {old} -> {pid})")
            if restarted_at is not None and _served_after(self.load, restarted_at):
                self.step("vLLM serving again")
                self._sleep(3)
                return
            self._sleep(0.5)
        self.step(f"no restart within {self.plan.stall_wait_s:.0f} s of the stall")


def _first_action(actions: list[dict[str, Any]], since: float, predictive: bool) -> dict[str, Any] | None:
    """The earliest action with a strategy taken on an alert received after ``since``."""
    hits = [a for a in actions if a.get("strategy") and (action_time(a, "received_at") or 0) >= since - 1
            and is_predictive(a) == predictive]
    return min(hits, key=lambda a: a["id"]) if hits else None


def _served_after(load: LoadDriver, t: float) -> bool:
    """A request answered successfully after ``t`` (the old server's requests died with it)."""
    return any(r.ok and at > t for at, r in load.snapshot()[-200:])
