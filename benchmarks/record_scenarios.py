"""Record failure scenarios on a real vLLM for the forecasting benchmark (see benchmarks/README.md).

For each scenario: a real vLLM (tiny local model; KV cache capped with ``--num-gpu-blocks-override``;
``--max-num-seqs`` set so the running-request limit is known) and a real Prometheus scraping it
every second; load replayed from a real request trace (shipped in ``vllm_otel/loadgen/data``: Azure 2023,
Mooncake) with prompts clipped to 1024 tokens and outputs to 128; faults injected for real. At the
end every ``vllm:`` and ``vllm_otel_`` series is downloaded with ``/api/v1/query_range`` (step 1 s)
into ``benchmarks/out/<scenario>.json``, and what happened when (phases, rates, faults, limits) into
``benchmarks/out/<scenario>.meta.json``. ``benchmarks/score_scenarios.py`` scores them.

Scenarios (default load durations; ``--minutes`` sets all):

* ``kv_ramp`` (5.75 min)    Azure conversation trace, 128 KV blocks, at most 32 running: the KV
                            cache is the limit. Twice: the arrival rate rises linearly until
                            Prometheus shows KV usage >= 0.95, stays there 11 s, falls back to calm
                            for 72 s; then a swell to 0.8 x the lowest rate that
                            failed, which should not fail.
* ``queue_ramp`` (5.75 min) Mooncake conversation trace (real shared prefixes), 192 KV blocks (at
                            most 0.75 used), at most 16 running: the same shape until 32 requests
                            wait (2 x max-num-seqs).
* ``kv_ramp_slow``, ``queue_ramp_slow`` (14 min) the same two at the pace of a traffic swell: each
                            rise takes 2.4 x as long (about 2 to 4 minutes from 0.5 x capacity).
* ``kv_ramp_large`` (5.75 min) ``kv_ramp`` with a KV cache four times as large (512 blocks, ~55
                            average requests; at most 128 running).
* ``kv_ramp_large_slow`` (14 min) ``kv_ramp_large`` at the pace of ``kv_ramp_slow``.
* ``stall`` (3 min)         Azure conversation trace at 0.5 x capacity from a pool of 24 connections;
                            120 s in (more than the 120 s horizon after the detector's warm-up), the
                            engine-core process is frozen (SIGSTOP) for 40 s, then resumed.
* ``leak`` (2 min)          steady load while a test-only plugin leaks 8 MB/s in the API-server
                            process; the memory budget is set before the load so that the leak
                            crosses it at about 60 % of the run (``memory_limit_bytes``).

A plain run records ``kv_ramp``, ``kv_ramp_large``, ``queue_ramp``, ``stall`` and ``leak``; the slow
variants are recorded with ``--scenario``.

Rates are relative to the capacity measured just before each scenario (a closed-loop probe outside
the recorded window), so the shape is the same on a fast or a busy host; a rate is applied to the
trace by compressing its inter-arrival times (arrival order and request sizes stay the trace's).

By default the engine gets GPU-like step times (``--step-ms 20 --us-per-token 50``, a benchmark-only
plugin in ``benchmarks/leaky_plugin``): the tiny model alone finishes requests in a fraction of a
second, which turns every overload into a jump between two scrapes. ``--step-ms 0`` records raw.

    flock /tmp/vllm-otel-heavy.lock .venv/bin/python benchmarks/record_scenarios.py [--scenario NAME]... [--minutes M]

A benchmark, not a test. Every process it starts runs in its own process group and is stopped at
the end (a stopped engine core is resumed first); the benchmark plugins are installed with
``pip install -e benchmarks/leaky_plugin`` for the run and uninstalled afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_otel.loadgen.replay import ReplaySummary, RequestResult, replay, run_replay  # noqa: E402
from vllm_otel.loadgen.traces import BLOCK_TOKENS, TraceRequest, load_trace  # noqa: E402
from vllm_otel.testing.rules import default_traces_dir  # noqa: E402
from vllm_otel.testing.services import PrometheusServer, VllmServer  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
PLUGIN_DIR = ROOT / "benchmarks" / "leaky_plugin"
PLUGIN_DIST = "vllm-otel-bench-plugins"
LEAK_PLUGIN, PACE_PLUGIN = "vllm_otel_bench_leak", "vllm_otel_bench_pace"
QUERY = '{__name__=~"vllm:.+|vllm_otel_.+"}'
MAX_INPUT, MAX_OUTPUT, MAX_MODEL_LEN = 1024, 128, 2048
REQUEST_TIMEOUT_S = 60.0
SEGMENT_S = 2.5          # a ramp's rate is constant within a segment
# The first calm lasts at least this long, so the first ramp starts after the forecaster's warm-up
# (60 s of data at the default 120 s horizon) plus a little history for its trend. A deployed
# forecaster has been watching long before a failure; with a 17 s calm, kv_ramp_large's first
# fill came 9 s after the warm-up ended and the detector could not have warned of it.
FIRST_CALM_S = 75.0
SCRAPE_S = 1.0
UNIQUE_IDS = 1 << 40     # synthetic hash ids for traces without prefix structure (Azure)

console = Console(stderr=True)
if not console.is_terminal:
    console = Console(stderr=True, width=150)


@dataclass(frozen=True)
class Scenario:
    name: str
    trace: str
    description: str
    num_gpu_blocks: int
    minutes: float
    kind: Literal["ramp", "steady"]
    max_num_seqs: int = 8
    trace_start: int = 0
    # ramp: rates as fractions of the measured capacity
    watch: Literal["kv", "queue"] = "kv"
    cycles: int = 2
    calm: float = 0.3
    ramp_from: float = 0.5
    peak: float = 1.4
    swell: float = 0.8                 # a rise that should stay below capacity (tests false alarms)
    # What ``swell`` is a fraction of: "failing", the lowest rate at which a ramp of this recording
    # failed (capacity when none did); "capacity", the probe's capacity (recordings before
    # 2026-11-28). The probe (closed loop) is not where an open-loop load fails: failing rates were
    # 0.78-1.40 x the probe, so a swell at 0.8 x the probe came within 6-13 % of the failing load,
    # or failed itself (kv_ramp_slow), and the false-alarm test meant something else each time.
    swell_of: Literal["failing", "capacity"] = "failing"
    # steady
    steady: float = 0.5
    concurrency: int | None = None
    stall_at: float | None = None      # fraction of the load duration
    stall_s: float = 40.0
    leak_mb_per_s: float = 0.0
    leak_limit_at: float = 0.6         # the memory budget is projected to be crossed here


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("kv_ramp", "AzureLLMInferenceTrace_conv.csv",
             "Azure conversation trace; 128 KV blocks (16k tokens), at most 32 running: the KV cache "
             "is the limit. Twice: rate rising until the KV cache is full, then calm; then a swell to "
             "0.8 x the lowest failing rate",
             num_gpu_blocks=128, max_num_seqs=32, minutes=5.75, kind="ramp", watch="kv"),
    Scenario("queue_ramp", "mooncake_conversation_trace.jsonl",
             "Mooncake conversation trace (shared prefixes); 192 KV blocks (at most 0.75 used), at most "
             "16 running: the running limit is the limit. Twice: rate rising until 2 x 16 requests "
             "wait, then calm; then a swell to 0.8 x the lowest failing rate",
             num_gpu_blocks=192, max_num_seqs=16, minutes=5.75, kind="ramp", watch="queue"),
    Scenario("stall", "AzureLLMInferenceTrace_conv.csv",
             "Azure conversation trace at 0.5 x capacity from a pool of 24 connections; 120 s in, the "
             "engine-core process is frozen (SIGSTOP) for 40 s, then resumed (SIGCONT)",
             num_gpu_blocks=192, max_num_seqs=16, minutes=3.0, kind="steady", trace_start=6000, steady=0.5,
             concurrency=24, stall_at=0.67),
    Scenario("leak", "AzureLLMInferenceTrace_conv.csv",
             "Azure conversation trace at 0.4 x capacity from a pool of 24 connections; a test plugin "
             "leaks 8 MB/s in the API server; memory budget crossed at about 60 % of the run",
             num_gpu_blocks=192, max_num_seqs=16, minutes=2.0, kind="steady", trace_start=12000, steady=0.4,
             concurrency=24, leak_mb_per_s=8.0),
)}
# The same two ramps at the pace of a traffic swell (the load doubles in about two minutes, not in
# under one): everything scales with the load duration, so each rise takes 2.4 x as long.
for _name in ("kv_ramp", "queue_ramp"):
    _s = SCENARIOS[_name]
    SCENARIOS[_name + "_slow"] = dataclasses.replace(
        _s, name=_name + "_slow", minutes=14.0,
        description=_s.description + "; rises 2.4 x slower (load 14 min)")
# kv_ramp with a KV cache four times as large (~55 average requests instead of ~14): on a GPU the
# cache holds hundreds of requests, so one burst of long prompts moves its usage by a few percent,
# not by half, as on the 128-block cache. Both sizes are recorded by default: the large one is
# the closer stand-in for a deployment, the tiny one the hardest case for a KV warning.
SCENARIOS["kv_ramp_large"] = dataclasses.replace(
    SCENARIOS["kv_ramp"], name="kv_ramp_large", num_gpu_blocks=512, max_num_seqs=128,
    description="Azure conversation trace; 512 KV blocks (64k tokens), at most 128 running: the KV "
                "cache is the limit. Twice: rate rising until the KV cache is full, then calm; then a "
                "swell to 0.8 x the lowest failing rate")
# The large cache at the slow pace: at the default pace a ramp covers the last 20 % of its
# failing rate in about 20 s, so a swell to 0.8 x that rate looks like a ramp 20 s before it
# fails (benchmarks/README.md); at 2.4 x slower, about 48 s.
SCENARIOS["kv_ramp_large_slow"] = dataclasses.replace(
    SCENARIOS["kv_ramp_large"], name="kv_ramp_large_slow", minutes=14.0,
    description=SCENARIOS["kv_ramp_large"].description + "; rises 2.4 x slower (load 14 min)")
# What a plain run records (~34 min); the other variants are recorded with --scenario.
DEFAULT_SCENARIOS = ("kv_ramp", "kv_ramp_large", "queue_ramp", "stall", "leak")


# ----------------------------------------------------------------------------------------------
# Live state shared by the load driver, the metrics poller and the progress display


@dataclass
class Live:
    phase: str = "start"
    rps: float = 0.0
    sent: int = 0
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    kv: float = math.nan
    running: float = math.nan
    waiting: float = math.nan
    polled_at: float = 0.0
    max_kv: float = 0.0
    max_waiting: float = 0.0

    def on_result(self, r: RequestResult) -> None:
        if r.ok:
            self.ok += 1
        else:
            self.failed += 1
            self.errors[r.error or "other"] = self.errors.get(r.error or "other", 0) + 1


_GAUGES = {"vllm:kv_cache_usage_perc": "kv", "vllm:num_requests_running": "running",
           "vllm:num_requests_waiting": "waiting"}
_LINE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+(\S+)$")
_LIVE_QUERY = '{__name__=~"vllm:(kv_cache_usage_perc|num_requests_running|num_requests_waiting)"}'


def _combine(pairs: list[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, v in pairs:
        key = _GAUGES.get(name)
        if key is not None:
            out[key] = max(out.get(key, v), v) if key == "kv" else out.get(key, 0.0) + v
    return out


def parse_gauges(text: str) -> dict[str, float]:
    """kv usage (max over engines), running and waiting (sums) from a /metrics page."""
    return _combine([(m.group(1), float(m.group(2))) for m in map(_LINE.match, text.splitlines()) if m])


async def poll_prometheus(prom_url: str, live: Live) -> None:
    """The latest scraped values, from Prometheus itself: ramps stop on what gets recorded."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                r = await client.get(f"{prom_url}/api/v1/query", params={"query": _LIVE_QUERY})
                g = _combine([(s["metric"]["__name__"], float(s["value"][1])) for s in r.json()["data"]["result"]])
                live.kv, live.running, live.waiting = (g.get("kv", math.nan), g.get("running", math.nan),
                                                       g.get("waiting", math.nan))
                live.polled_at = time.time()
                live.max_kv = max(live.max_kv, g.get("kv", 0.0))
                live.max_waiting = max(live.max_waiting, g.get("waiting", 0.0))
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(SCRAPE_S / 2)


# ----------------------------------------------------------------------------------------------
# Trace handling


def unique_prompts(reqs: list[TraceRequest], base: int) -> list[TraceRequest]:
    """Give requests without prefix structure (Azure) their own hash ids, so every prompt is unique
    across replay calls (the replayer keys synthetic prompts by index within one call). Mooncake
    requests keep their real hash ids: their shared prefixes are part of the trace."""
    out = []
    for i, r in enumerate(reqs):
        if r.hash_ids:
            out.append(r)
        else:
            n = max(1, math.ceil(min(r.input_tokens, MAX_INPUT) / BLOCK_TOKENS))
            out.append(dataclasses.replace(r, hash_ids=tuple(UNIQUE_IDS + base + 16 * i + b for b in range(n))))
    return out


class Cursor:
    """Walks a trace in trace time; ``take(trace_seconds)`` returns the next slice, rebased to 0."""

    def __init__(self, reqs: list[TraceRequest]):
        self.reqs, self.i, self.tau = reqs, 0, reqs[0].offset_s if reqs else 0.0

    def take(self, trace_seconds: float) -> list[TraceRequest]:
        end = self.tau + trace_seconds
        j = self.i
        while j < len(self.reqs) and self.reqs[j].offset_s < end:
            j += 1
        batch = [dataclasses.replace(r, offset_s=r.offset_s - self.tau) for r in self.reqs[self.i:j]]
        self.i, self.tau = j, end
        if self.i >= len(self.reqs):
            raise RuntimeError("trace exhausted; use a smaller --minutes or a later trace_start")
        return batch


def trace_rate(reqs: list[TraceRequest]) -> float:
    span = reqs[-1].offset_s - reqs[0].offset_s
    return (len(reqs) - 1) / span if span > 0 else 1.0


# ----------------------------------------------------------------------------------------------
# Processes


def engine_core(server: VllmServer) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise RuntimeError("no EngineCore child process found")


def tree_rss(server: VllmServer) -> int:
    root = psutil.Process(server.proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def raise_open_file_limit() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# ----------------------------------------------------------------------------------------------
# Load drivers


class Driver:
    def __init__(self, sc: Scenario, server: VllmServer, reqs: list[TraceRequest], capacity_rps: float,
                 live: Live, load_s: float):
        self.sc, self.server, self.live, self.load_s = sc, server, live, load_s
        self.cursor = Cursor(reqs)
        self.rate = trace_rate(reqs[: min(len(reqs), 3000)])
        self.cap = capacity_rps
        self.tasks: list[asyncio.Task[ReplaySummary]] = []
        self.phases: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.saturations: list[float] = []
        self.failing_rps: list[float] = []  # the arrival rate when each ramp's failure showed
        self.swell_rps: float | None = None
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()

    def el(self) -> float:
        return self.loop.time() - self.t0

    def _send(self, batch: list[TraceRequest], speed: float, concurrency: int | None = None) -> None:
        if not batch:
            return
        self.live.sent += len(batch)
        self.tasks.append(asyncio.create_task(replay(
            batch, self.server.url, speed=speed, model=self.server.served_model_name,
            max_input_tokens=MAX_INPUT, max_output_tokens=MAX_OUTPUT, concurrency=concurrency,
            timeout_s=REQUEST_TIMEOUT_S, progress=False, on_result=self.live.on_result)))

    def failing(self) -> bool:
        lv, sc = self.live, self.sc
        if time.time() - lv.polled_at > 3 * SCRAPE_S:
            return False
        if sc.watch == "kv":
            return lv.kv >= 0.95
        return lv.waiting >= 2 * sc.max_num_seqs

    async def run_for(self, duration: float, rps: Callable[[float], float], phase: str,
                      stop_when: Callable[[], bool] | None = None) -> bool:
        """Send segments for ``duration`` s (rate ``rps(elapsed)``); True when ``stop_when`` fired."""
        start, end = self.el(), self.el() + duration
        if self.phases and self.phases[-1]["phase"] == phase:  # an extension of the same phase
            rec = self.phases[-1]
        else:
            rec = {"phase": phase, "start": time.time(), "rps_from": rps(start)}
            self.phases.append(rec)
        if phase != self.live.phase:
            console.log(f"{self.sc.name}: {phase} at {rec['rps_from']:.1f} req/s")
        self.live.phase = phase
        stopped = False
        seg_start = start
        while seg_start < end - 1e-6:
            seg = min(SEGMENT_S, end - seg_start)
            r = max(rps(seg_start), 1e-3)
            self.live.rps = r
            speed = r / self.rate
            self._send(self.cursor.take(speed * seg), speed)
            seg_start += seg
            while self.el() < seg_start:
                await asyncio.sleep(min(0.25, seg_start - self.el()))
                if stop_when is not None and stop_when():
                    stopped = True
                    break
            if stopped:
                break
        rec.update(end=time.time(), rps_to=self.live.rps, stopped_early=stopped)
        return stopped

    async def ramp(self) -> None:
        """Arrival rate over the load duration L (``x`` = measured capacity):

        calm at ``calm``x for 0.05 L (at least ``FIRST_CALM_S``); then per cycle: a linear rise
        from ``ramp_from``x towards ``peak``x over at most 0.28 L that stops as soon as Prometheus
        shows the watched failure, 0.033 L more at that rate, and calm again for 0.21 L (longer
        while still failing), so consecutive failures are more than the 120 s horizon apart; then
        a swell to ``swell`` x the lowest rate at which a ramp failed (``swell_of``; a rise that
        stays below the failing load: alarms there are false alarms) and calm to the end.
        """
        sc, L = self.sc, self.load_s
        calm, start, swell, peak = (f * self.cap for f in (sc.calm, sc.ramp_from, sc.swell, sc.peak))

        def const(v: float) -> Callable[[float], float]:
            return lambda _t: v

        def linear(a: float, b: float, duration: float) -> Callable[[float], float]:
            t0 = self.el()
            return lambda t: a + (b - a) * min(1.0, (t - t0) / duration)

        await self.run_for(max(0.05 * L, FIRST_CALM_S), const(calm), "calm")
        for c in range(sc.cycles):
            sat = await self.run_for(0.28 * L, linear(start, peak, 0.28 * L), f"ramp{c + 1}",
                                     stop_when=self.failing)
            if not sat:  # capacity was underestimated: hold the peak until it saturates
                sat = await self.run_for(0.1 * L, const(peak), f"peak{c + 1}", stop_when=self.failing)
            if sat:
                self.saturations.append(time.time())
                self.failing_rps.append(self.live.rps)
            await self.run_for(0.033 * L, const(self.live.rps), f"overload{c + 1}")
            await self.run_for(0.21 * L, const(calm), f"recover{c + 1}")
            extra = 0.0
            while self.failing() and extra < 0.1 * L:
                await self.run_for(SEGMENT_S, const(calm), f"recover{c + 1}")
                extra += SEGMENT_S
        if sc.swell_of == "failing" and self.failing_rps:
            swell = sc.swell * min(self.failing_rps)
        self.swell_rps = swell
        console.log(f"{sc.name}: swell to {swell:.2f} req/s (failing at "
                    f"{', '.join(f'{r:.2f}' for r in self.failing_rps) or '-'} req/s, capacity {self.cap:.2f})")
        await self.run_for(0.07 * L, linear(calm, swell, 0.07 * L), "swell")
        await self.run_for(0.03 * L, const(swell), "swell")
        await self.run_for(max(0.04 * L, L - self.el()), const(calm), "calm")

    async def steady(self) -> None:
        sc, L = self.sc, self.load_s
        rps = sc.steady * self.cap
        speed = rps / self.rate
        self.live.phase, self.live.rps = "steady", rps
        console.log(f"{sc.name}: steady at {rps:.1f} req/s" + (f", at most {sc.concurrency} in flight" if sc.concurrency else ""))
        self.phases.append({"phase": "steady", "start": time.time(), "rps_from": rps, "rps_to": rps})
        self._send(self.cursor.take(speed * L), speed, concurrency=sc.concurrency)
        if sc.stall_at is not None:
            await asyncio.sleep(max(0.0, sc.stall_at * L - self.el()))
            deadline = self.el() + 15.0
            while not (self.live.running > 0) and self.el() < deadline:
                await asyncio.sleep(0.2)  # freeze it with work in flight, as a real hang would
            proc = engine_core(self.server)
            running_at_stop = self.live.running
            proc.send_signal(signal.SIGSTOP)
            t_stop = time.time()
            console.log(f"{sc.name}: SIGSTOP engine core pid {proc.pid} ({running_at_stop:.0f} running) for {sc.stall_s:g} s")
            self.live.phase = "STALLED"
            try:
                await asyncio.sleep(sc.stall_s)
            finally:
                proc.send_signal(signal.SIGCONT)
            t_cont = time.time()
            console.log(f"{sc.name}: SIGCONT engine core pid {proc.pid}")
            self.live.phase = "steady"
            self.faults.append({"fault": "sigstop_engine_core", "pid": proc.pid, "start": t_stop,
                                "end": t_cont, "running_at_stop": running_at_stop})
        await asyncio.sleep(max(0.0, L - self.el()))
        self.phases[-1]["end"] = time.time()

    async def drain(self) -> dict[str, Any]:
        summaries = await asyncio.gather(*self.tasks)
        errors: dict[str, int] = {}
        for s in summaries:
            for k, v in s.errors.items():
                errors[k] = errors.get(k, 0) + v
        return {"requests": sum(s.requests for s in summaries), "ok": sum(s.ok for s in summaries),
                "errors": errors, "output_tokens": sum(s.output_tokens for s in summaries)}


def measure_capacity(server: VllmServer, reqs: list[TraceRequest], concurrency: int) -> float:
    """Closed-loop throughput (requests/s) with ``concurrency`` in flight: the scale for the rates."""
    n = 16 + 2 * concurrency
    run_replay(reqs[:16], server.url, speed=1e6, concurrency=concurrency, model=server.served_model_name,
               max_input_tokens=MAX_INPUT, max_output_tokens=MAX_OUTPUT, progress=False)  # warm-up
    s = run_replay(reqs[16:n], server.url, speed=1e6, concurrency=concurrency, model=server.served_model_name,
                   max_input_tokens=MAX_INPUT, max_output_tokens=MAX_OUTPUT, progress=False)
    if s.ok == 0:
        raise RuntimeError(f"capacity probe failed: {s.errors} {s.error_examples}")
    return s.ok / s.duration_s


def wait_idle(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            g = parse_gauges(httpx.get(f"{url}/metrics", timeout=5).text)
            if g.get("running", 1) == 0 and g.get("waiting", 1) == 0:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------
# Prometheus download


def download(prom_url: str, start: float, end: float, chunk_s: float = 1800.0) -> dict[str, Any]:
    """``query_range`` of QUERY at step 1 s, in chunks, merged into one matrix response."""
    series: dict[tuple[tuple[str, str], ...], dict[float, str]] = {}
    labels: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    t = start
    with httpx.Client(timeout=120) as client:
        while t <= end:
            t1 = min(end, t + chunk_s)
            r = client.get(f"{prom_url}/api/v1/query_range",
                           params={"query": QUERY, "start": f"{t:.3f}", "end": f"{t1:.3f}", "step": "1"})
            r.raise_for_status()
            body = r.json()
            if body.get("status") != "success":
                raise RuntimeError(f"query_range failed: {body}")
            for s in body["data"]["result"]:
                key = tuple(sorted(s["metric"].items()))
                labels[key] = s["metric"]
                series.setdefault(key, {}).update({float(ts): v for ts, v in s["values"]})
            t = t1 + 1.0
    result = [{"metric": labels[k], "values": [[ts, v[ts]] for ts in sorted(v)]} for k, v in series.items()]
    return {"status": "success", "data": {"resultType": "matrix", "result": result}}


# ----------------------------------------------------------------------------------------------
# One scenario


def record(sc: Scenario, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    wall0 = time.monotonic()
    load_s = (args.minutes or sc.minutes) * 60.0
    trace_path = args.traces / sc.trace
    all_reqs = load_trace(trace_path)
    reqs = unique_prompts(all_reqs[sc.trace_start:sc.trace_start + 20000], base=sc.trace_start * 16)
    probe = unique_prompts(all_reqs[-300:], base=(len(all_reqs) - 300) * 16)
    work = args.out / "logs" / sc.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    task = progress.add_task(sc.name, total=load_s, status="starting vLLM + Prometheus")

    env: dict[str, str] = {}
    plugins = ["vllm_otel"]
    meta: dict[str, Any] = {"scenario": sc.name, "description": sc.description, "trace": sc.trace,
                            "config": dataclasses.asdict(sc), "load_s": load_s, "scrape_interval_s": SCRAPE_S,
                            "max_num_seqs": sc.max_num_seqs, "num_gpu_blocks": sc.num_gpu_blocks,
                            "block_size": 128, "max_model_len": MAX_MODEL_LEN,
                            "clip": {"input": MAX_INPUT, "output": MAX_OUTPUT},
                            "step_pacing": {"step_ms": args.step_ms, "us_per_token": args.us_per_token}}
    if args.step_ms > 0:
        env.update(VLLM_OTEL_BENCH_STEP_MS=f"{args.step_ms:g}", VLLM_OTEL_BENCH_STEP_US_PER_TOKEN=f"{args.us_per_token:g}")
        plugins.append(PACE_PLUGIN)
    if sc.leak_mb_per_s > 0:
        env["VLLM_OTEL_BENCH_LEAK_MB_PER_S"] = f"{sc.leak_mb_per_s:g}"
        plugins.append(LEAK_PLUGIN)
    server = VllmServer(args.model, work, max_model_len=MAX_MODEL_LEN, num_gpu_blocks=sc.num_gpu_blocks,
                        plugins=",".join(plugins), env=env, name="vllm",
                        extra_args=["--max-num-seqs", str(sc.max_num_seqs)])
    with server:
        with PrometheusServer(work, targets={"vllm": [server.url]}, scrape_interval=f"{SCRAPE_S:g}s") as prom:
            progress.update(task, status="measuring capacity (closed loop, not recorded)")
            cap = measure_capacity(server, probe, sc.max_num_seqs)
            wait_idle(server.url, 60)
            time.sleep(5.0)
            t_start = time.time()
            meta.update(capacity_rps=cap, record_start=t_start)
            if sc.leak_mb_per_s > 0:
                rss = tree_rss(server)
                meta["rss_at_start_bytes"] = rss
                meta["memory_limit_bytes"] = int(rss + sc.leak_mb_per_s * 2**20 * sc.leak_limit_at * load_s)
            live = Live()
            summary = asyncio.run(_drive(sc, server, prom.url, reqs, cap, live, load_s, progress, task, meta))
            progress.update(task, completed=load_s, status="draining, then idle tail")
            wait_idle(server.url, 90)
            time.sleep(8.0)
            t_end = time.time()
            meta.update(record_end=t_end, replay=summary, max_kv_seen=live.max_kv,
                        max_waiting_seen=live.max_waiting)
            time.sleep(2 * SCRAPE_S)  # let the last scrape land
            progress.update(task, status="downloading from Prometheus")
            data = download(prom.url, t_start - 5.0, t_end)
    out = args.out / f"{sc.name}.json"
    out.write_text(json.dumps(data, separators=(",", ":")))
    meta["series"] = len(data["data"]["result"])
    meta["recording_wall_s"] = time.monotonic() - wall0
    (args.out / f"{sc.name}.meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(work / "prometheus-data", ignore_errors=True)
    progress.update(task, status=f"[green]done[/] -> {_rel(out)} ({out.stat().st_size / 1e6:.1f} MB)")
    return meta


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


async def _drive(sc: Scenario, server: VllmServer, prom_url: str, reqs: list[TraceRequest], cap: float, live: Live,
                 load_s: float, progress: Progress, task: Any, meta: dict[str, Any]) -> dict[str, Any]:
    poller = asyncio.create_task(poll_prometheus(prom_url, live))
    driver = Driver(sc, server, reqs, cap, live, load_s)

    async def show() -> None:
        while True:
            progress.update(task, completed=min(driver.el(), load_s), status=(
                f"{live.phase:<10} {live.rps:5.1f} req/s  sent {live.sent} ok {live.ok} "
                f"failed {live.failed}  kv {live.kv:.2f} run {live.running:.0f} wait {live.waiting:.0f}"))
            await asyncio.sleep(0.5)

    shower = asyncio.create_task(show())
    try:
        await (driver.ramp() if sc.kind == "ramp" else driver.steady())
        live.phase = "draining"
        summary = await driver.drain()
    finally:
        for t in (poller, shower):
            t.cancel()
    meta.update(phases=driver.phases, faults=driver.faults, saturations=driver.saturations,
                failing_rps=driver.failing_rps, swell_rps=driver.swell_rps, swell_of=sc.swell_of,
                trace_rate_rps=driver.rate)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                    help=f"record only this scenario (repeatable): {', '.join(SCENARIOS)}; default: "
                         f"{', '.join(DEFAULT_SCENARIOS)}")
    ap.add_argument("--minutes", type=float, help="load duration of every scenario in minutes "
                    "(default: kv_ramp, kv_ramp_large and queue_ramp 5.75, the _slow versions 14, stall 3, leak 2)")
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default benchmarks/out)")
    ap.add_argument("--model", type=Path, default=ROOT / ".cache" / "tiny-model")
    ap.add_argument("--traces", type=Path, default=default_traces_dir(), help="folder of the trace files")
    ap.add_argument("--step-ms", type=float, default=20.0, help="GPU-like pacing: every engine step that runs "
                    "the model takes this many ms more (benchmarks/leaky_plugin/vllm_otel_bench_pace.py); "
                    "0: the tiny model's raw CPU timing (default 20)")
    ap.add_argument("--us-per-token", type=float, default=50.0,
                    help="pacing: plus this many microseconds per scheduled token (default 50)")
    args = ap.parse_args()
    if args.traces is None or not args.traces.is_dir():
        console.print("[red]trace folder not found; pass --traces or set VLLM_OTEL_TRACES_DIR[/]")
        return 2
    if args.minutes is not None and args.minutes < 1:
        console.print("[red]--minutes must be at least 1[/]")
        return 2
    if not (args.model / "config.json").exists():
        console.print(f"creating the tiny model in {args.model}")
        subprocess.run([sys.executable, "-m", "vllm_otel", "tiny-model", str(args.model)], check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    raise_open_file_limit()
    # A SIGTERM (e.g. a timeout) unwinds like Ctrl-C: a frozen engine core is resumed, servers are
    # stopped by process group and the benchmark plugins are uninstalled.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = args.scenario or list(DEFAULT_SCENARIOS)
    t0 = time.monotonic()
    metas: list[dict[str, Any]] = []
    need_plugins = args.step_ms > 0 or any(SCENARIOS[n].leak_mb_per_s > 0 for n in names)
    try:
        if need_plugins:
            console.log(f"pip install -e {_rel(PLUGIN_DIR)} (benchmark-only plugins, removed at the end)")
            pip("install", "--no-build-isolation", "--no-deps", "-e", str(PLUGIN_DIR))
        with Progress(TextColumn("[bold]{task.description:<11}"), BarColumn(bar_width=24), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=console) as progress:
            for name in names:
                metas.append(record(SCENARIOS[name], args, progress))
    finally:
        if need_plugins:
            try:
                pip("uninstall", "-y", PLUGIN_DIST)
                console.log(f"uninstalled {PLUGIN_DIST}")
            except subprocess.CalledProcessError as e:
                console.print(f"[red]could not uninstall {PLUGIN_DIST}: {e.stderr!r}; "
                              f"run: {sys.executable} -m pip uninstall -y {PLUGIN_DIST}[/]")
    table = Table(title=f"recorded {len(metas)} scenario(s) in {(time.monotonic() - t0) / 60:.1f} min")
    for col in ("scenario", "wall", "capacity", "requests", "ok", "failed", "max kv", "max waiting", "faults",
                "series"):
        table.add_column(col, justify="left" if col in ("scenario", "faults") else "right")
    for m in metas:
        rp = m["replay"]
        faults = ", ".join(f"{f['fault']} {f['end'] - f['start']:.0f}s" for f in m.get("faults", []))
        if "memory_limit_bytes" in m:
            faults = f"leak, budget {m['memory_limit_bytes'] / 2**30:.2f} GiB"
        table.add_row(m["scenario"], f"{m['recording_wall_s'] / 60:.1f} min", f"{m['capacity_rps']:.1f}/s",
                      str(rp["requests"]), str(rp["ok"]), str(rp["requests"] - rp["ok"]),
                      f"{m['max_kv_seen']:.2f}", f"{m['max_waiting_seen']:.0f}", faults, str(m["series"]))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
