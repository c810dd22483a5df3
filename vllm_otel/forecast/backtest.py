"""Backtest: replay recorded series through the detector, label failures, score against baselines.

The replay feeds a :class:`~vllm_otel.forecast.promjson.RawFrame` to a fresh
:class:`~vllm_otel.forecast.detector.PredictiveFailureDetector` one time step at a time, exactly as
the service would see it. Failures are labelled by the catalog definitions applied to the signals
the detector computed at each step (causal, so labels and predictions never disagree on data).

Scoring, per failure type and method (our detector; Prometheus ``predict_linear`` over a lookback
window extrapolated by the same horizon, with the same threshold; a static early-warning threshold
at a fraction of the failure threshold):

* an **event** is a run of failing steps (runs closer than ``merge_gap_s`` are one event);
  it is *caught* when an alarm episode (a run of alarming steps) of the method *started* within
  the horizon before its onset and after the previous event of that type (on that instance)
  ended, and the **lead time** is onset minus the start of the first such episode. An alarm
  still on from an earlier failure, or one that began before the horizon, does not count;
* an **alarm** is a run of alarming steps; it is *true* when a failure is under way during it or
  begins within the horizon after it ends, else it is a **false alarm**;
* recall = caught / events, precision = true alarms / alarms, false alarms per instance-hour
  of data, median lead over caught events, F1 from recall and precision;
* quiet time in alarm: of the steps with data where no failure is under way or begins within
  the horizon, the share the method spent alarming. Precision counts episodes, so one long alarm
  that runs into a failure counts as one true alarm however long it lasts: an alarm that is
  always on scores precision 1.00 on a recording where failures keep coming. This share shows it.

With ``hold_s`` (``--hold`` on the command line) each method's alarm is scored as an alert rule
with Prometheus's ``keep_firing_for: <hold_s>`` would page: it stays on for that long after the
method stops alarming. A warning that flickers across the threshold is then one page from its
first crossing, not several short ones, so precision counts it once (a flicker no longer adds
true alarms) and the alarm run still on at the onset starts where the page did. Every method is
held alike. The default (0) scores the raw steps.

Every method alarms while a failure is already under way (it is visible to all), so what
separates them is what happens before onsets and in quiet periods.

Whether the detector's numbers can be taken at their word (:func:`calibration`): at every step
with a probability and no failure under way, the outcome is whether a failure of that type
begins within the horizon (steps whose horizon runs past the end of the data without one are
left out: their outcome is unknown). Reported: the Brier score, its skill against always
forecasting the base rate, and a reliability table (steps binned by probability: the mean
forecast against how often the failure came). For the time to failure, at the steps that
alarmed and were followed by an onset within the horizon: the predicted time against the actual
time to the onset (median and 90th-percentile absolute error, and how often the failure came
sooner than said). Those steps are chosen by their outcome, so they favour early failures: the
detector's time is the median of the first passage, unconditional (the time by which the failure
is more likely than not, and none where it is less likely than not within the horizon), and at
p = 0.7 a failure that does come is expected before it. The unbiased check of that time is over
every step that gave one, whatever followed: the share where a failure began by the time said,
which is 0.5 when the time is what it claims to be.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterator

import numpy as np

from vllm_otel.forecast.detector import PredictiveFailureDetector
from vllm_otel.forecast.detector_config import DetectorConfig
from vllm_otel.forecast.failures import SCORE_SIGNAL, STRICT
from vllm_otel.forecast.promjson import RawFrame

__all__ = ["ReplayResult", "MethodScore", "Calibration", "replay", "iter_jsonl", "write_jsonl", "predict_linear",
           "score", "score_alarms", "hold_alarms", "method_alarms", "score_json", "calibration", "calibration_rows",
           "reliability_rows", "METHODS", "CALIBRATION_LEGEND"]

METHODS = ("detector", "predict_linear", "static")


@dataclass
class ReplayResult:
    t: np.ndarray                        # (T,)
    step_s: float
    horizon_s: float
    units: list[str]
    failure_types: tuple[str, ...]
    probability: np.ndarray              # (U, T, F) float32; NaN: no prediction
    time_to_failure: np.ndarray          # (U, T, F) float32; NaN: none within the horizon
    labels: np.ndarray                   # (U, T, F) bool: failing at that step
    present: np.ndarray                  # (U, T) bool: the unit had data
    signal: np.ndarray                   # (U, T, F) the failure's score signal
    threshold: np.ndarray                # (U, T, F) its threshold (NaN: unknown yet)
    refits: int = 0


def replay(frame: RawFrame, config: DetectorConfig | None = None,
           detector: type[PredictiveFailureDetector] = PredictiveFailureDetector) -> ReplayResult:
    """Run the detector (``detector``: a subclass, to compare a precursor model) over every step of ``frame``."""
    cfg = config or DetectorConfig(step_s=frame.step_s or 5.0)
    det = detector(cfg)
    U, T, fts = len(frame.units), len(frame.t), det.failure_types
    F = len(fts)
    prob = np.full((U, T, F), np.nan, dtype=np.float32)
    ttf = np.full((U, T, F), np.nan, dtype=np.float32)
    labels = np.zeros((U, T, F), dtype=bool)
    signal = np.full((U, T, F), np.nan)
    thresh = np.full((U, T, F), np.nan)
    present = frame.present()
    index = {u: i for i, u in enumerate(frame.units)}
    for k in range(T):
        # Units with data now, plus the ones the detector still follows (a gap for them);
        # units not started yet or long gone are left out, as a live service would not see them.
        known = set(det.instances)
        sel = np.array([i for i, u in enumerate(frame.units) if present[i, k] or u in known], dtype=np.int64)
        if not len(sel):
            continue
        values, hists = frame.at(k, sel)
        res = det.step(float(frame.t[k]), [frame.units[i] for i in sel], values, hists)
        if res is None:
            continue
        rows = np.array([index[u] for u in res.units], dtype=np.int64)
        prob[rows, k] = res.probability
        ttf[rows, k] = res.time_to_failure
        labels[rows, k] = res.breached
        for j, f in enumerate(fts):
            signal[rows, k, j] = res.signals[SCORE_SIGNAL[f]]
            thresh[rows, k, j] = det.catalog.threshold(f, res.signals)
    return ReplayResult(frame.t.copy(), float(cfg.step_s), float(cfg.horizon_s), list(frame.units), fts,
                        prob, ttf, labels, present, signal, thresh, det.refits)


def iter_jsonl(result: ReplayResult) -> Iterator[str]:
    """One JSON line per step, instance and failure type that has a prediction."""
    names = [json.dumps(u) for u in result.units]
    fnames = [json.dumps(f) for f in result.failure_types]
    for k, t in enumerate(result.t):
        tk = json.dumps(float(t))
        p_k, ttf_k = result.probability[:, k, :], result.time_to_failure[:, k, :]
        for u, j in zip(*np.nonzero(np.isfinite(p_k))):
            ttf = ttf_k[u, j]
            ttf_s = "null" if not np.isfinite(ttf) else repr(round(float(ttf), 3))
            yield (f'{{"t": {tk}, "instance": {names[u]}, "failure_type": {fnames[j]}, '
                   f'"probability": {round(float(p_k[u, j]), 6)!r}, "time_to_failure_seconds": {ttf_s}}}')


def write_jsonl(result: ReplayResult, fh: IO[str]) -> int:
    n = 0
    for line in iter_jsonl(result):
        fh.write(line + "\n")
        n += 1
    return n


def predict_linear(values: np.ndarray, t: np.ndarray, window_s: float, horizon_s: float) -> np.ndarray:
    """Prometheus ``predict_linear(v[window], horizon)`` at every step, for (U, T) values.

    Least squares over the samples in ``(t - window, t]`` (NaN skipped), evaluated ``horizon``
    seconds after ``t``; NaN with fewer than two samples.
    """
    x = (t - t[0])[None, :]
    ok = np.isfinite(values)
    y = np.where(ok, values, 0.0)
    m = ok.astype(float)

    def csum(a: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(a, axis=1)], axis=1)

    c_n, c_x, c_y = csum(m), csum(m * x), csum(y)
    c_xx, c_xy = csum(m * x * x), csum(y * x)
    start = np.searchsorted(t, t - window_s, side="right")
    end = np.arange(1, len(t) + 1)

    def win(c: np.ndarray) -> np.ndarray:
        return c[:, end] - c[:, start]

    n, sx, sy, sxx, sxy = win(c_n), win(c_x), win(c_y), win(c_xx), win(c_xy)
    with np.errstate(invalid="ignore", divide="ignore"):
        den = n * sxx - sx * sx
        slope = np.where(den > 0, (n * sxy - sx * sy) / den, np.nan)
        intercept = (sy - slope * sx) / n
        pred = intercept + slope * (x + horizon_s)
    return np.where(n >= 2, pred, np.nan)


@dataclass
class MethodScore:
    failure_type: str
    method: str
    events: int
    caught: int
    alarms: int
    false_alarms: int
    recall: float | None
    precision: float | None
    f1: float | None
    false_alarms_per_hour: float
    median_lead_s: float | None
    quiet_alarm_share: float | None = None   # share of quiet steps (no failure now or within the horizon) in alarm


def _runs(mask: np.ndarray, merge_gap: int = 0) -> list[tuple[int, int]]:
    """[start, end] index pairs of True runs; runs separated by <= merge_gap False steps join."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > merge_gap + 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def _quiet(labels: np.ndarray, horizon: int) -> np.ndarray:
    """(U, T): no failure at this step or within the next ``horizon`` steps."""
    T = labels.shape[1]
    # the index of the next failing step at or after each step; none ahead counts as quiet to
    # the end of the data (as for precision, which calls an alarm there false)
    idx = np.where(labels, np.arange(T)[None, :], T + horizon + 1)
    nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    return (nxt - np.arange(T)[None, :]) > horizon


def hold_alarms(alarm: np.ndarray, steps: int) -> np.ndarray:
    """(U, T) bool -> on wherever the alarm was on within the last ``steps`` steps (inclusive):
    what an alert rule with ``keep_firing_for`` of that many steps shows."""
    alarm = np.asarray(alarm, dtype=bool)
    if steps <= 0 or alarm.size == 0:
        return alarm
    k = np.arange(alarm.shape[-1])
    last = np.maximum.accumulate(np.where(alarm, k, -steps - 1), axis=-1)   # last step it was on
    return (k - last) <= steps


def score_alarms(f: str, method: str, alarm: np.ndarray, labels: np.ndarray, t: np.ndarray,
                 horizon: int, merge_gap: int, hours: float, present: np.ndarray | None = None) -> MethodScore:
    """Score one method's alarms, (U, T) bool, against the failure labels, (U, T) bool, as the
    module docstring says; ``horizon`` and ``merge_gap`` in steps, ``hours`` of data for the
    false-alarm rate, ``present`` (U, T) the steps with data (all when None)."""
    events = caught = alarms = false = 0
    leads: list[float] = []
    for u in range(labels.shape[0]):
        episodes = _runs(alarm[u])
        prev_end = -1  # index of the last failing step of the previous event (none yet)
        for onset, end in _runs(labels[u], merge_gap):
            events += 1
            # Only an alarm episode that *starts* after the previous failure ended and within the
            # horizon before this onset warns of it: an alarm lingering on from an earlier failure
            # (or started before the horizon) says nothing about this one.
            lo = max(onset - horizon, prev_end + 1, 0)
            starts = [s for s, _ in episodes if lo <= s < onset]
            if starts:
                caught += 1
                leads.append(float(t[onset] - t[starts[0]]))
            prev_end = end
        for start, end in episodes:
            alarms += 1
            if not labels[u, start:end + horizon + 1].any():
                false += 1
    recall = caught / events if events else None
    precision = (alarms - false) / alarms if alarms else None
    f1 = (2 * recall * precision / (recall + precision) if recall and precision else
          (0.0 if events else None))
    quiet = _quiet(labels, horizon) & (present if present is not None else True)
    n_quiet = int(quiet.sum())
    return MethodScore(f, method, events, caught, alarms, false, recall, precision, f1,
                       false / hours if hours > 0 else 0.0,
                       float(np.median(leads)) if leads else None,
                       float((alarm & quiet).sum()) / n_quiet if n_quiet else None)


def method_alarms(result: ReplayResult, j: int, threshold: float = 0.7, baseline_window_s: float = 300.0,
                  static_fraction: float = 0.8, hold_s: float = 0.0) -> dict[str, np.ndarray]:
    """Each method's (U, T) alarms for failure type ``j``: the detector at ``threshold``,
    ``predict_linear`` over ``baseline_window_s``, the static rule at ``static_fraction`` of the
    threshold, each held ``hold_s`` after it stops, and every method on while the failure is."""
    f = result.failure_types[j]
    sig, thr, lab = result.signal[:, :, j], result.threshold[:, :, j], result.labels[:, :, j]
    held = int(round(hold_s / result.step_s))
    with np.errstate(invalid="ignore"):
        pl = predict_linear(sig, result.t, baseline_window_s, result.horizon_s)
        static_thr = static_fraction * thr if f != "gpu_hardware" else thr
        raw = {"detector": result.probability[:, :, j] >= threshold,
               "predict_linear": (pl > thr) if f in STRICT else (pl >= thr),
               "static": (sig > static_thr) if f in STRICT else (sig >= static_thr)}
    return {m: np.asarray(hold_alarms(raw[m], held) | lab, dtype=bool) for m in METHODS}


def score(result: ReplayResult, threshold: float = 0.7, baseline_window_s: float = 300.0,
          static_fraction: float = 0.8, merge_gap_s: float = 60.0, hold_s: float = 0.0) -> list[MethodScore]:
    """Score the detector and both baselines for every failure type the data could show; with
    ``hold_s``, each method's alarms held on for that long after they stop (see the module doc)."""
    t, step = result.t, result.step_s
    horizon = max(1, int(round(result.horizon_s / step)))
    merge_gap = int(round(merge_gap_s / step))
    hours = float(result.present.sum()) * step / 3600.0
    out: list[MethodScore] = []
    for j, f in enumerate(result.failure_types):
        if not np.isfinite(result.signal[:, :, j]).any():
            continue  # nothing in the data can show this failure
        alarms = method_alarms(result, j, threshold, baseline_window_s, static_fraction, hold_s)
        for method in METHODS:
            out.append(score_alarms(f, method, alarms[method], result.labels[:, :, j], t, horizon, merge_gap,
                                    hours, result.present))
    return out


@dataclass
class Calibration:
    """How far the detector's probability and time to failure for one failure type can be trusted."""
    failure_type: str
    steps: int                           # with a probability, no failure under way, outcome known
    base_rate: float | None              # share of them followed by an onset within the horizon
    brier: float | None                  # mean (p - outcome)^2; 0 is perfect
    brier_skill: float | None            # 1 - brier / brier of always forecasting the base rate
    alarm_steps: int                     # of those, with p >= the alarm threshold
    alarm_hit_rate: float | None         # share of alarming steps followed by an onset
    bins: list[dict[str, float]]         # reliability: lo, hi, steps, mean_p, observed
    ttf_steps: int                       # alarming steps followed by an onset, with a predicted time
    ttf_median_abs_error_s: float | None
    ttf_p90_abs_error_s: float | None
    ttf_sooner_share: float | None       # the failure came sooner than the predicted time
    ttf_dated_steps: int                 # steps (as for ``steps``) with a predicted time, whatever followed
    ttf_by_share: float | None           # of them, a failure began by that time (0.5: a true median)


def calibration(result: ReplayResult, threshold: float = 0.7, n_bins: int = 10) -> list[Calibration]:
    """Reliability of the detector's probabilities and times to failure (see the module docstring),
    per failure type that had at least one step with a probability and a known outcome."""
    t, H = result.t, max(1, int(round(result.horizon_s / result.step_s)))
    T = len(t)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out: list[Calibration] = []
    for j, f in enumerate(result.failure_types):
        lab = result.labels[:, :, j]
        # index of the first failing step after each step (T + H + 1: none)
        idx = np.where(lab, np.arange(T)[None, :], T + H + 1)
        nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
        nxt = np.concatenate([nxt[:, 1:], np.full((lab.shape[0], 1), T + H + 1)], axis=1)
        ahead = nxt - np.arange(T)[None, :]              # steps until the next onset after k
        hit = ahead <= H
        known = hit | (np.arange(T)[None, :] + H <= T - 1)
        p = result.probability[:, :, j].astype(float)
        use = np.isfinite(p) & ~lab & known & result.present
        if not use.any():
            continue
        pv, ov = np.clip(p[use], 0.0, 1.0), hit[use].astype(float)
        base = float(ov.mean())
        brier = float(np.mean((pv - ov) ** 2))
        ref = base * (1.0 - base)
        bins = []
        which = np.clip(np.searchsorted(edges, pv, side="right") - 1, 0, n_bins - 1)
        for b in range(n_bins):
            m = which == b
            if m.any():
                bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "steps": int(m.sum()),
                             "mean_p": float(pv[m].mean()), "observed": float(ov[m].mean())})
        alarm = use & (p >= threshold)
        ttf = result.time_to_failure[:, :, j].astype(float)
        timed = alarm & hit & np.isfinite(ttf)
        onset_t = t[np.minimum(nxt, T - 1)]
        err = ttf[timed] - (onset_t - t[None, :])[timed]  # > 0: the failure came sooner than said
        dated = use & np.isfinite(ttf)
        # hit implies nxt < T, so onset_t is the real onset there
        by = hit & ((onset_t - t[None, :]) <= ttf)
        out.append(Calibration(
            f, int(use.sum()), base, brier, (1.0 - brier / ref) if ref > 0 else None,
            int(alarm.sum()), float(hit[alarm].mean()) if alarm.any() else None, bins,
            int(timed.sum()),
            float(np.median(np.abs(err))) if len(err) else None,
            float(np.percentile(np.abs(err), 90)) if len(err) else None,
            float((err > 0).mean()) if len(err) else None,
            int(dated.sum()), float(by[dated].mean()) if dated.any() else None))
    return out


def _fmt(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def calibration_rows(cals: list[Calibration], threshold: float) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the calibration summary, for a terminal or markdown table."""
    header = ["failure_type", "steps", "base rate", "Brier", "Brier skill", f"p>={threshold:g}", "then failed",
              "TTF err s", "TTF p90 s", "sooner", "with TTF", "by TTF"]
    rows = [[c.failure_type, str(c.steps), _fmt(c.base_rate, ".3f"), _fmt(c.brier, ".3f"), _fmt(c.brier_skill),
             str(c.alarm_steps), _fmt(c.alarm_hit_rate), _fmt(c.ttf_median_abs_error_s, ".0f"),
             _fmt(c.ttf_p90_abs_error_s, ".0f"),
             "-" if c.ttf_sooner_share is None else f"{100 * c.ttf_sooner_share:.0f} %",
             str(c.ttf_dated_steps), _fmt(c.ttf_by_share)] for c in cals]
    return header, rows


CALIBRATION_LEGEND = (
    "Brier skill: 1 - Brier / Brier of always forecasting the base rate (> 0: better than that). "
    "p>=X: steps at the alarm level; then failed: the share of them followed by an onset within the "
    "horizon; TTF err s / TTF p90 s: median / p90 absolute error of the time to failure at those, "
    "sooner: the share where the failure came sooner than said (these steps are picked by their "
    "outcome, which favours early failures); with TTF: every step with a time to failure, whatever "
    "followed; by TTF: the share of them where a failure began by that time (0.5 when the time is "
    "the median it claims to be).")


def reliability_rows(cals: list[Calibration]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the reliability tables: per failure type and probability bin, the mean
    forecast against the share of those steps followed by an onset within the horizon."""
    header = ["failure_type", "p from", "p to", "steps", "mean forecast", "observed"]
    rows = [[c.failure_type, f"{b['lo']:.1f}", f"{b['hi']:.1f}", str(b["steps"]), f"{b['mean_p']:.2f}",
             f"{b['observed']:.2f}"] for c in cals for b in c.bins]
    return header, rows


def score_json(rows: list[MethodScore], result: ReplayResult, calibrations: list[Calibration] | None = None,
               **params: Any) -> dict[str, Any]:
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    out = {
        "step_s": result.step_s, "horizon_s": result.horizon_s, **params,
        "instances": len(result.units), "steps": len(result.t),
        "instance_hours": float(result.present.sum()) * result.step_s / 3600.0,
        "results": [{k: clean(v) for k, v in asdict(r).items()} for r in rows],
    }
    if calibrations is not None:
        out["calibration"] = [{k: clean(v) for k, v in asdict(c).items()} for c in calibrations]
    return out
