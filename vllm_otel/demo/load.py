"""Open-loop load at a rate the demo sets, from a real request trace.

The trace's own arrival pattern (bursts and lulls) is kept and compressed in time to the target
rate: each second the driver sends the next stretch of the trace that holds ``rate`` requests on
average, at the matching speed-up. Request sizes are the trace's (prompts and outputs clipped).
The driver runs its own event loop in a daemon thread, so the demo's main thread stays free for
the terminal view and the observer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from vllm_otel.loadgen.replay import RequestResult, replay
from vllm_otel.loadgen.traces import TraceRequest

__all__ = ["LoadDriver", "probe_capacity"]

SEGMENT_S = 1.0


@dataclass
class _Cursor:
    """Walks through the trace; wraps around at its end (offsets keep increasing)."""

    requests: Sequence[TraceRequest]
    pos_s: float = 0.0
    index: int = 0
    lap_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("the trace has no requests")
        self.span_s = max(self.requests[-1].offset_s, 1e-3) + 1e-3

    @property
    def rate(self) -> float:
        """The trace's own mean arrival rate (requests per trace second)."""
        return len(self.requests) / self.span_s

    def take(self, trace_s: float) -> list[TraceRequest]:
        """Requests arriving in the next ``trace_s`` of trace time, offsets rebased to 0."""
        end = self.pos_s + trace_s
        out: list[TraceRequest] = []
        while True:
            r = self.requests[self.index]
            t = self.lap_s + r.offset_s
            if t >= end:
                break
            out.append(TraceRequest(offset_s=max(0.0, t - self.pos_s), input_tokens=r.input_tokens,
                                    output_tokens=r.output_tokens, hash_ids=r.hash_ids))
            self.index += 1
            if self.index == len(self.requests):
                self.index, self.lap_s = 0, self.lap_s + self.span_s
        self.pos_s = end
        return out


@dataclass
class LoadDriver:
    url: str
    requests: Sequence[TraceRequest]
    model: str = "tiny"
    max_input_tokens: int = 256
    max_output_tokens: int = 256
    timeout_s: float = 240.0
    rate: float = 0.0                       # requests per second, set by the scenario at any time
    results: list[tuple[float, RequestResult]] = field(default_factory=list)  # (finished at, result)
    sent: int = 0

    def __post_init__(self) -> None:
        self.cursor = _Cursor(self.requests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> "LoadDriver":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():  # an interrupt can come before the load ever started
            self._thread.join(timeout_s)

    def _record(self, r: RequestResult) -> None:
        with self._lock:
            self.results.append((time.time(), r))

    def snapshot(self) -> list[tuple[float, RequestResult]]:
        with self._lock:
            return list(self.results)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        tasks: set[asyncio.Task[Any]] = set()
        next_t = time.monotonic()
        while not self._stop.is_set():
            rate = self.rate
            if rate > 0:
                speed = rate / self.cursor.rate
                batch = self.cursor.take(speed * SEGMENT_S)
                if batch:
                    self.sent += len(batch)
                    task = asyncio.create_task(replay(
                        batch, self.url, speed=speed, model=self.model, max_input_tokens=self.max_input_tokens,
                        max_output_tokens=self.max_output_tokens, timeout_s=self.timeout_s, progress=False,
                        on_result=self._record))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            next_t += SEGMENT_S
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        # Stopping: what is still in flight is cancelled (clients disconnect; vLLM aborts it).
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def probe_capacity(url: str, requests: Sequence[TraceRequest], *, concurrency: int, seconds: float,
                   model: str = "tiny", max_input_tokens: int = 256, max_output_tokens: int = 256) -> float:
    """Requests per second the server completes with ``concurrency`` always in flight (a closed
    loop): the rate the overload ramp is scaled to."""
    done: list[float] = []

    async def main() -> None:
        start = time.monotonic()
        task = asyncio.create_task(replay(
            list(requests), url, speed=1e6, model=model, concurrency=concurrency,
            max_input_tokens=max_input_tokens, max_output_tokens=max_output_tokens, progress=False,
            timeout_s=120, on_result=lambda r: done.append(time.monotonic() - start) if r.ok else None))
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    # The first completions come after a ramp-up of one request's length: count from the first.
    if len(done) < 2:
        return float(len(done)) / seconds
    return (len(done) - 1) / max(1e-3, done[-1] - done[0])
