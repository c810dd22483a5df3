"""From raw Prometheus samples to the signals the forecaster models.

Two layers:

* **Inputs**: logical names (``kv_usage``, ``preemptions``, ``ttft``...) for the raw series, each
  fed by one or more :class:`Selector` (metric name plus label regexes), with a kind (gauge,
  counter, histogram) and a rule for combining several series of one unit (several GPUs of one
  server, several processes). Renamed metrics are handled by adding a selector, not code.
* **Signals**: what the catalog and the models look at (``kv_usage``, ``waiting``,
  ``preemptions_window``, ``ttft_quantile``, ``flat_seconds``...). :class:`SignalExtractor` turns
  one time step of inputs for many units into signals, vectorised over units, keeping only the
  short ring buffers the windows need: counters become per-step increases (a drop is a counter
  reset, i.e. a restart, and the new value is the increase, as Prometheus' ``increase`` does),
  histogram buckets become windowed quantiles (``histogram_quantile`` semantics), gaps are NaN.

The extractor is causal: a signal at ``t`` uses samples at or before ``t`` only, so the backtest
can label failures from the very signals the detector saw, with no look-ahead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vllm_otel.forecast.failures import FailureCatalog
from vllm_otel.forecast.rows import row_index, shared_position

__all__ = [
    "Selector", "InputSeries", "INPUT_KINDS", "SIGNALS", "SignalExtractor", "histogram_quantile",
    "HistogramInput", "aggregate", "collect_samples",
]

Kind = Literal["gauge", "counter", "histogram"]
Agg = Literal["sum", "max", "min"]

# input -> (kind, how several series of one unit combine). Sums for things that add up across
# processes or GPUs (requests, counters, resident memory); max/min where the worst device decides.
INPUT_KINDS: dict[str, tuple[Kind, Agg]] = {
    "kv_usage": ("gauge", "max"),
    "running": ("gauge", "sum"),
    "waiting": ("gauge", "sum"),
    "preemptions": ("counter", "sum"),
    "generation_tokens": ("counter", "sum"),
    "ttft": ("histogram", "sum"),
    "process_memory": ("gauge", "sum"),
    "gpu_memory_used": ("gauge", "max"),
    "gpu_memory_total": ("gauge", "max"),
    "gpu_temperature": ("gauge", "max"),
    "gpu_slowdown_temperature": ("gauge", "min"),
    "gpu_thermal_throttle": ("gauge", "max"),
    "gpu_xid": ("counter", "sum"),
    "gpu_ecc_uncorrected": ("counter", "sum"),
    "gpu_row_remap_failure": ("gauge", "max"),
    "gpu_ecc_corrected": ("counter", "sum"),
    "finished": ("counter", "sum"),
}

# Every signal the extractor produces, in a fixed order (the backtest stores them by this order).
SIGNALS: tuple[str, ...] = (
    "kv_usage", "waiting", "running", "running_limit", "preemptions_window", "generation_rate",
    "flat_seconds", "ttft_quantile", "memory_fraction", "gpu_temperature", "gpu_temperature_limit",
    "gpu_throttle", "hardware_events", "ecc_corrected_window", "restarted", "finished",
)


class Selector(BaseModel):
    """One series name plus label regexes (full match), e.g. ``reason`` of a clocks-event gauge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    labels: dict[str, str] = Field(default_factory=dict)

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        if name != self.metric:
            return False
        return all(re.fullmatch(rx, labels.get(k, "")) for k, rx in self.labels.items())


def _sel(metric: str, **labels: str) -> Selector:
    return Selector(metric=metric, labels=labels)


class InputSeries(BaseModel):
    """Which raw series feed each input. Defaults: vLLM 0.10+ (V1) names and vllm-otel's collectors.

    Histograms name the ``_bucket`` series. Older vLLM names are listed after the current ones.
    """

    model_config = ConfigDict(extra="forbid")

    kv_usage: list[Selector] = [_sel("vllm:kv_cache_usage_perc"), _sel("vllm:gpu_cache_usage_perc")]
    running: list[Selector] = [_sel("vllm:num_requests_running")]
    waiting: list[Selector] = [_sel("vllm:num_requests_waiting")]
    preemptions: list[Selector] = [_sel("vllm:num_preemptions_total")]
    generation_tokens: list[Selector] = [_sel("vllm:generation_tokens_total")]
    ttft: list[Selector] = [_sel("vllm:time_to_first_token_seconds_bucket")]
    process_memory: list[Selector] = [_sel("vllm_otel_process_resident_memory_bytes")]
    gpu_memory_used: list[Selector] = [_sel("vllm_otel_gpu_memory_used_bytes")]
    gpu_memory_total: list[Selector] = [_sel("vllm_otel_gpu_memory_total_bytes")]
    gpu_temperature: list[Selector] = [_sel("vllm_otel_gpu_temperature_celsius")]
    gpu_slowdown_temperature: list[Selector] = [_sel("vllm_otel_gpu_slowdown_temperature_celsius")]
    gpu_thermal_throttle: list[Selector] = [
        _sel("vllm_otel_gpu_clocks_event_reasons", reason="hw_thermal_slowdown|sw_thermal_slowdown")]
    gpu_xid: list[Selector] = [_sel("vllm_otel_gpu_xid_errors_total")]
    gpu_ecc_uncorrected: list[Selector] = [
        _sel("vllm_otel_gpu_ecc_errors_volatile_total", error_type="uncorrected")]
    gpu_row_remap_failure: list[Selector] = [_sel("vllm_otel_gpu_row_remap_failure")]
    gpu_ecc_corrected: list[Selector] = [
        _sel("vllm_otel_gpu_ecc_errors_volatile_total", error_type="corrected")]
    # requests that left the engine (every finished_reason): with the change in running + waiting,
    # the arrival rate; with the running count, the service time (Little's law)
    finished: list[Selector] = [_sel("vllm:request_success_total")]

    def metric_names(self) -> set[str]:
        return {s.metric for name in INPUT_KINDS for s in getattr(self, name)}

    def match(self, name: str, labels: Mapping[str, str]) -> str | None:
        """The input a raw series feeds, or None. An input's selectors are tried in order."""
        for inp in INPUT_KINDS:
            for sel in getattr(self, inp):
                if sel.matches(name, labels):
                    return inp
        return None


@dataclass(frozen=True)
class HistogramInput:
    """Cumulative bucket counts of one histogram for n units: ``les`` ascending, ending in +Inf."""

    les: np.ndarray        # (B,)
    counts: np.ndarray     # (n, B); NaN where a unit lacks a bucket


def histogram_quantile(q: float, les: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Prometheus ``histogram_quantile`` over rows of cumulative counts (n, B); NaN for empty rows.

    Missing buckets (NaN) take the count of the bucket below, and counts are forced monotonic, the
    same repair Prometheus applies to non-monotonic buckets.
    """
    c = np.fmax.accumulate(counts, axis=1)
    c = np.nan_to_num(c, nan=0.0)
    total = c[:, -1]
    rank = q * total
    idx = np.argmax(c >= rank[:, None], axis=1)
    n_b = len(les)
    rows = np.arange(len(c))
    below = np.where(idx > 0, c[rows, np.maximum(idx - 1, 0)], 0.0)
    in_bucket = c[rows, idx] - below
    finite_les = les[:-1] if n_b > 1 else les
    upper = np.where(idx < n_b - 1, les[np.minimum(idx, n_b - 1)], np.nan)
    lower = np.where(idx > 0, les[np.maximum(idx - 1, 0)], 0.0)
    lower = np.minimum(lower, upper)  # a first bucket with a negative bound starts at its bound
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(in_bucket > 0, (rank - below) / in_bucket, 1.0)
        val = lower + (upper - lower) * frac
    # Rank in the +Inf bucket: Prometheus answers the highest finite bound.
    top = finite_les[-1] if len(finite_les) else np.nan
    val = np.where(idx >= n_b - 1, top, val)
    return np.where(total > 0, val, np.nan)


class _Counter:
    """Last value per row; increases with reset handling. NaN in, NaN out; a gap keeps the last."""

    def __init__(self, shape: tuple[int, ...]):
        self.last = np.full(shape, np.nan)

    def grow(self, cap: int) -> None:
        self.last = _grow(self.last, cap)

    def step(self, rows: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prev = self.last[row_index(rows)]
        ok = np.isfinite(v)
        have = ok & np.isfinite(prev)
        reset = have & (v < prev)
        inc = np.where(have, np.where(reset, v, v - prev), np.nan)
        self.last[rows] = np.where(ok, v, prev)
        return inc, reset


class _Window:
    """Ring of (time, value) per row; sums entries newer than ``t - window``.

    A window of histograms (``width`` buckets) also keeps its values with unknowns as 0 and a
    known mask, slot by slot (slot, row, bucket), so the usual sum reads each slot once, in one
    block.
    """

    def __init__(self, cap: int, length: int, width: int | None = None):
        self.len = length
        self.width = width
        self.ts = np.full((cap, length), -np.inf)
        shape = (cap, length) if width is None else (cap, length, width)
        self.vals = np.full(shape, np.nan)
        self.pos = np.zeros(cap, dtype=np.int64)
        if width is not None:
            self._zero = np.zeros((length, cap, width))
            self._known = np.zeros((length, cap, width), dtype=bool)

    def grow(self, cap: int) -> None:
        self.ts = _grow(self.ts, cap, -np.inf)
        self.vals = _grow(self.vals, cap)
        self.pos = _grow(self.pos, cap, 0)
        if self.width is not None and self._zero.shape[1] < cap:
            old = self._zero.shape[1]
            zero = np.zeros((self.len, cap, self.width))
            known = np.zeros((self.len, cap, self.width), dtype=bool)
            zero[:, :old], known[:, :old] = self._zero, self._known
            self._zero, self._known = zero, known

    def widen(self, mapping: np.ndarray, width: int) -> None:
        """Move existing columns to new positions (histogram bucket sets that grew)."""
        new = np.full(self.vals.shape[:2] + (width,), np.nan)
        new[:, :, mapping] = self.vals
        self.vals, self.width = new, width
        self._known = np.ascontiguousarray(np.isfinite(new).transpose(1, 0, 2))
        self._zero = np.ascontiguousarray(np.where(np.isfinite(new), new, 0.0).transpose(1, 0, 2))

    def clear(self, rows: np.ndarray) -> None:
        self.ts[rows] = -np.inf
        self.vals[rows] = np.nan
        self.pos[rows] = 0
        if self.width is not None:
            self._zero[:, rows] = 0.0
            self._known[:, rows] = False

    def push(self, rows: np.ndarray, t: float, v: np.ndarray) -> None:
        ix = row_index(rows)
        p = self.pos[ix]
        p0 = shared_position(p)
        if p0 is not None and isinstance(ix, slice):  # every row at the same slot: one column
            self.ts[ix, p0] = t
            self.vals[ix, p0] = v
            self.pos[ix] = (p0 + 1) % self.len
            if self.width is not None:
                known = np.isfinite(v)
                self._known[p0, ix] = known
                self._zero[p0, ix] = np.where(known, v, 0.0)
            return
        self.ts[rows, p] = t
        self.vals[rows, p] = v
        self.pos[rows] = (p + 1) % self.len
        if self.width is not None:
            known = np.isfinite(v)
            self._known[p, rows] = known
            self._zero[p, rows] = np.where(known, v, 0.0)

    def entries(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(times, values) of the ring, (rows, length): -inf / NaN where nothing was pushed."""
        return self.ts[rows], self.vals[rows]

    def total(self, rows: np.ndarray, t: float, window: float) -> np.ndarray:
        """Sum over the window; NaN where the window holds no known value at all."""
        ix = row_index(rows)
        inside = self.ts[ix] > t - window + 1e-9
        if self.width is not None:
            if len(inside) and (inside == inside[:1]).all():
                # Every row pushed at the same times (the usual case): add up only the slots
                # inside the window, one (rows, buckets) slice at a time. A sum along axis 1 of a
                # 3-d array runs slot by slot in order, so leaving out the zeros of the slots
                # outside gives the very same numbers.
                s = np.zeros((len(inside), self.width))
                any_known = np.zeros((len(inside), self.width), dtype=bool)
                for c in np.flatnonzero(inside[0]):
                    s += self._zero[c, ix]
                    any_known |= self._known[c, ix]
                return np.where(any_known, s, np.nan)
            inside = inside[:, :, None]
        vals = self.vals[ix]
        known = inside & np.isfinite(vals)
        s = np.where(known, vals, 0.0).sum(axis=1)
        return np.where(known.any(axis=1), s, np.nan)


def _grow(a: np.ndarray, cap: int, fill: float = np.nan) -> np.ndarray:
    if a.shape[0] >= cap:
        return a
    out = np.full((cap,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def _ring_len(window_s: float, step_s: float) -> int:
    # Two spare slots: one for the sample at the window's edge, one for jitter in scrape times.
    return max(2, int(math.ceil(window_s / step_s)) + 2)


class SignalExtractor:
    """Turns inputs of one time step into signals for many units (rows), keeping window state."""

    def __init__(self, catalog: FailureCatalog, step_s: float, capacity: int = 16):
        self.catalog = catalog
        self.step_s = float(step_s)
        self.cap = 0
        self._pre_w = catalog.preemption_storm.window_s
        self._ttft_w = catalog.ttft_slo_breach.window_s
        self._hw_w = catalog.gpu_hardware.window_s
        self._counters = {k: _Counter((0,)) for k in
                          ("preemptions", "generation_tokens", "gpu_xid", "gpu_ecc_uncorrected",
                           "gpu_ecc_corrected", "finished")}
        self._pre = _Window(0, _ring_len(self._pre_w, step_s))
        self._hw = _Window(0, _ring_len(self._hw_w, step_s))
        self._ecc = _Window(0, _ring_len(self._hw_w, step_s))
        self._ttft_les: np.ndarray | None = None
        self._ttft_counter: _Counter | None = None
        self._ttft = _Window(0, _ring_len(self._ttft_w, step_s), width=1)
        self._last_t = np.zeros(0)
        self._last_progress = np.zeros(0)
        self._running_limit = np.zeros(0)
        self._remap_prev = np.zeros(0)
        self.grow(capacity)

    def preemption_increments(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scrape times, preemptions since the scrape before), (rows, ring length), covering at
        least the storm window: what the window's count is made of."""
        return self._pre.entries(rows)

    # -- row management -------------------------------------------------------------------
    def grow(self, cap: int) -> None:
        if cap <= self.cap:
            return
        for c in self._counters.values():
            c.grow(cap)
        for w in (self._pre, self._hw, self._ecc, self._ttft):
            w.grow(cap)
        if self._ttft_counter is not None:
            self._ttft_counter.grow(cap)
        self._last_t = _grow(self._last_t, cap)
        self._last_progress = _grow(self._last_progress, cap)
        self._running_limit = _grow(self._running_limit, cap)
        self._remap_prev = _grow(self._remap_prev, cap)
        self.cap = cap

    def clear(self, rows: np.ndarray) -> None:
        """Forget rows (a unit that disappeared, a row about to be reused)."""
        for c in self._counters.values():
            c.last[rows] = np.nan
        if self._ttft_counter is not None:
            self._ttft_counter.last[rows] = np.nan
        for w in (self._pre, self._hw, self._ecc, self._ttft):
            w.clear(rows)
        for a in (self._last_t, self._last_progress, self._running_limit, self._remap_prev):
            a[rows] = np.nan

    # -- one time step --------------------------------------------------------------------
    def _hist_counts(self, rows: np.ndarray, h: HistogramInput | None) -> np.ndarray | None:
        """Bucket counts mapped onto the extractor's bucket set (grown when new bounds appear)."""
        if h is None:
            return None
        les = np.asarray(h.les, dtype=float)
        if self._ttft_les is None or not np.isin(les, self._ttft_les).all():
            union = np.union1d(les, self._ttft_les if self._ttft_les is not None else les)
            if self._ttft_les is not None and self._ttft_counter is not None:
                mapping = np.searchsorted(union, self._ttft_les)
                last = np.full((self.cap, len(union)), np.nan)
                last[:, mapping] = self._ttft_counter.last
                self._ttft_counter.last = last
                self._ttft.widen(mapping, len(union))
            else:
                self._ttft_counter = _Counter((self.cap, len(union)))
                self._ttft = _Window(self.cap, self._ttft.len, width=len(union))
            self._ttft_les = union
        out = np.full((len(rows), len(self._ttft_les)), np.nan)
        out[:, np.searchsorted(self._ttft_les, les)] = h.counts
        return out

    def update(self, rows: np.ndarray, t: float, values: Mapping[str, np.ndarray],
               histograms: Mapping[str, HistogramInput] | None = None) -> dict[str, np.ndarray]:
        """Signals at ``t`` for ``rows``; ``values[input]`` are (n,) arrays (absent input = NaN)."""
        n = len(rows)
        nan = np.full(n, np.nan)

        def get(name: str) -> np.ndarray:
            v = values.get(name)
            return nan if v is None else np.asarray(v, dtype=float)

        cat = self.catalog
        out: dict[str, np.ndarray] = {}
        restarted = np.zeros(n, dtype=bool)
        inc: dict[str, np.ndarray] = {}
        for name, counter in self._counters.items():
            inc[name], reset = counter.step(rows, get(name))
            if name in ("preemptions", "generation_tokens"):
                restarted |= reset

        out["kv_usage"] = get("kv_usage")
        running, waiting = get("running"), get("waiting")
        out["running"], out["waiting"] = running, waiting

        # The running-request limit, learned causally: while requests wait, the scheduler is full,
        # so the number running then is what this server can run (max_num_seqs or KV-bound).
        seen = np.where((waiting > 0) & (running > 0), running, np.nan)
        self._running_limit[rows] = np.fmax(self._running_limit[rows], seen)
        out["running_limit"] = self._running_limit[rows].copy()

        self._pre.push(rows, t, inc["preemptions"])
        out["preemptions_window"] = self._pre.total(rows, t, self._pre_w)

        prev_t = self._last_t[rows]
        dt = t - prev_t
        with np.errstate(invalid="ignore", divide="ignore"):
            out["generation_rate"] = np.where(dt > 0, inc["generation_tokens"] / dt, np.nan)
        out["flat_seconds"] = self._flat(rows, t, running, waiting, inc["generation_tokens"])

        counts = self._hist_counts(rows, (histograms or {}).get("ttft"))
        if counts is not None and self._ttft_counter is not None and self._ttft_les is not None:
            b_inc, b_reset = self._ttft_counter.step(rows, counts)
            restarted |= b_reset[:, -1]
            self._ttft.push(rows, t, b_inc)
            window = self._ttft.total(rows, t, self._ttft_w)
            out["ttft_quantile"] = histogram_quantile(cat.ttft_slo_breach.quantile, self._ttft_les, window)
        else:
            out["ttft_quantile"] = nan

        mem = cat.memory_exhaustion
        proc = get("process_memory") / mem.process_limit_bytes if mem.process_limit_bytes else nan
        with np.errstate(invalid="ignore", divide="ignore"):
            gpu = get("gpu_memory_used") / (get("gpu_memory_total") * mem.gpu_limit_fraction)
        gpu = np.where(np.isfinite(gpu), gpu, np.nan)
        out["memory_fraction"] = np.fmax(proc, gpu)

        out["gpu_temperature"] = get("gpu_temperature")
        limit = get("gpu_slowdown_temperature")
        th = cat.gpu_thermal
        out["gpu_temperature_limit"] = (np.full(n, th.slowdown_c) if th.slowdown_c is not None
                                        else np.where(np.isfinite(limit), limit, th.fallback_slowdown_c))
        out["gpu_throttle"] = get("gpu_thermal_throttle")

        remap = get("gpu_row_remap_failure")
        prev_remap = self._remap_prev[rows]
        remap_new = np.where(np.isfinite(remap) & np.isfinite(prev_remap),
                             ((remap > 0) & ~(prev_remap > 0)).astype(float), np.nan)
        self._remap_prev[rows] = np.where(np.isfinite(remap), remap, prev_remap)
        hw_parts = np.stack([inc["gpu_xid"], inc["gpu_ecc_uncorrected"], remap_new])
        hw = np.where(np.isfinite(hw_parts).any(axis=0), np.nansum(hw_parts, axis=0), np.nan)
        self._hw.push(rows, t, hw)
        out["hardware_events"] = self._hw.total(rows, t, self._hw_w)
        self._ecc.push(rows, t, inc["gpu_ecc_corrected"])
        out["ecc_corrected_window"] = self._ecc.total(rows, t, self._hw_w)

        out["restarted"] = restarted.astype(float)
        out["finished"] = inc["finished"]   # requests finished since the last step (NaN: unknown)
        self._last_t[rows] = t
        return out

    def _flat(self, rows: np.ndarray, t: float, running: np.ndarray, waiting: np.ndarray,
              gen_inc: np.ndarray) -> np.ndarray:
        """Seconds since generation tokens last grew while requests were present (0 when idle).

        Any step with no request present, or with tokens produced, restarts the clock; a step
        with unknown data leaves the clock alone and reports NaN.
        """
        requests = np.where(np.isfinite(running) | np.isfinite(waiting),
                            np.nan_to_num(running) + np.nan_to_num(waiting), np.nan)
        last = self._last_progress[rows]
        idle = requests == 0
        progressed = gen_inc > 0
        stuck = (requests > 0) & (gen_inc == 0)
        first = ~np.isfinite(last)
        new_last = np.where(idle | progressed | (first & stuck), t, last)
        self._last_progress[rows] = new_last
        flat = np.where(idle | progressed, 0.0, np.where(stuck, t - new_last, np.nan))
        return flat


def aggregate(agg: Agg, values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Combine several series of one unit; all-NaN stays NaN (no data is not zero)."""
    values = np.asarray(values, dtype=float)
    known = np.isfinite(values).any(axis=axis)
    with np.errstate(invalid="ignore"):
        if agg == "sum":
            out = np.nansum(values, axis=axis)
        else:
            filled = np.where(np.isfinite(values), values, -np.inf if agg == "max" else np.inf)
            out = filled.max(axis=axis) if agg == "max" else filled.min(axis=axis)
    return np.where(known, out, np.nan)


def collect_samples(samples: Iterable[tuple[str, Mapping[str, str], float]],
                    inputs: InputSeries) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Raw samples of one instance at one time -> input values and histogram buckets."""
    groups: dict[str, list[float]] = {}
    hists: dict[str, dict[float, float]] = {}
    for name, labels, value in samples:
        inp = inputs.match(name, labels)
        if inp is None:
            continue
        kind, _ = INPUT_KINDS[inp]
        if kind == "histogram":
            le = float(labels.get("le", "nan"))
            if le == le:
                h = hists.setdefault(inp, {})
                h[le] = h.get(le, 0.0) + float(value)
        else:
            groups.setdefault(inp, []).append(float(value))
    values = {k: float(aggregate(INPUT_KINDS[k][1], np.array(v))) for k, v in groups.items()}
    return values, hists

