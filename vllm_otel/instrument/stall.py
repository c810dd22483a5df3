"""Forward-progress (hang) detection.

vLLM's ``/health`` keeps answering 200 while the engine core is wedged (vLLM issues #19849,
#39863, #37729). We watch what the engine reports instead: if requests are running or waiting
and no token has been produced for ``timeout_s`` (including the case where the engine stops
reporting at all, e.g. a stopped or deadlocked engine-core process), the engine is stalled.

The check runs on its own daemon thread, not on vLLM's event loop, so it still runs when the
loop or the engine core is stuck; it ticks every ``timeout_s / 4`` (at most 1 s), so a stall is
flagged at most ``timeout_s + tick`` after the last token: inside the 2x budget.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["ProgressState", "StallDetector"]


@dataclass
class ProgressState:
    """Per-engine progress facts, written by the stat logger (cheap plain attribute writes)."""

    running: int = 0
    waiting: int = 0
    last_report: float = field(default_factory=time.time)    # last stat-logger call
    last_progress: float = field(default_factory=time.time)  # last token produced
    stalled: bool = False
    stall_events: int = 0
    stalled_since: float | None = None
    held: bool = False  # paused or asleep on purpose (control endpoint): silence is no stall


class StallDetector:
    def __init__(self, engines: Callable[[], dict[int, ProgressState]], timeout_s: float,
                 pending_since: Callable[[float], float | None] = lambda since: None,
                 on_change: Callable[[int, bool, str], None] = lambda e, s, why: None,
                 clock: Callable[[], float] = time.time) -> None:
        self._engines = engines
        self.timeout_s = timeout_s
        self._pending_since = pending_since
        self._on_change = on_change
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick_s = min(1.0, timeout_s / 4)

    def start(self) -> "StallDetector":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vllm-otel-stall", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a watchdog must outlive its own bugs
                pass

    def check(self) -> None:
        now = self._clock()
        for idx, st in list(self._engines().items()):
            busy = st.running + st.waiting > 0
            # The oldest unfinished request accepted at most one timeout before the engine's
            # last report: older entries were the engine's to report long ago (one lost entry
            # must not make an idle engine look stalled).
            pending = self._pending_since(st.last_report - self.timeout_s)
            # Such a request, accepted more than the timeout ago, and an engine silent for as
            # long: it has work and says nothing. (Not only requests that arrived after its last
            # report: one accepted just before it may still have been in the front end when the
            # engine said "0 running, 0 waiting" and froze.) A healthy engine with work reports
            # every step; an idle one has no unfinished requests.
            unacknowledged = (pending is not None and now - pending > self.timeout_s
                              and now - st.last_report > self.timeout_s)
            quiet_for = now - max(st.last_progress, st.last_report if not busy else st.last_progress)
            stalled = not st.held and ((busy and quiet_for > self.timeout_s) or unacknowledged)
            if stalled and not st.stalled:
                st.stalled, st.stalled_since = True, now
                st.stall_events += 1
                why = (f"{st.running} running / {st.waiting} waiting, no token for {quiet_for:.1f} s"
                       if busy else f"engine silent for {now - st.last_report:.1f} s with requests pending")
                self._on_change(idx, True, why)
            elif not stalled and st.stalled:
                st.stalled, st.stalled_since = False, None
                self._on_change(idx, False, "progress resumed")
