"""Score the recorded scenarios (benchmarks/record_scenarios.py) with the forecasting backtest.

Each ``benchmarks/out/<scenario>.json`` (a Prometheus query_range response) is replayed step by step
through a fresh :class:`~vllm_otel.forecast.detector.PredictiveFailureDetector`, failures are
labelled by the catalog definitions, and the detector is scored against Prometheus
``predict_linear`` (same horizon and thresholds) and a static early-warning threshold, exactly as
``vllm-otel backtest --score`` does (:mod:`vllm_otel.forecast.backtest`). Two settings come from
the recording's ``.meta.json``, as an operator would configure them: the running-request limit
(``--max-num-seqs``, so queue overload means ``waiting >= 2 x max_num_seqs``) and, for the leak,
the memory budget.

Printed: one row per scenario x failure type x method (recall, precision, F1, false alarms per
hour, median lead), the same pooled over all scenarios, the pooled calibration of the detector's
probabilities and times to failure (``vllm_otel.forecast.backtest.calibration``: Brier skill,
reliability bins, time-to-failure error), and pass/fail against the targets:

* ``kv_cache_exhaustion``, ``queue_overload``, ``engine_stall`` (detector, pooled): recall >= 0.9
  and precision >= 0.8 at probability 0.7;
* median lead >= 30 s (kv, queue); for ``engine_stall``: every stall alarmed at the latest two
  scrape intervals after the definition (tokens flat for 20 s with requests present) is met;
* on every scenario where the failure occurs: better F1 and longer median lead than predict_linear.

    .venv/bin/python benchmarks/score_scenarios.py [--dir benchmarks/out] [--scenario NAME]... [--markdown] [--json] [--detector-config JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_otel.forecast.backtest import (CALIBRATION_LEGEND, METHODS, MethodScore, ReplayResult,  # noqa: E402
                                         calibration, calibration_rows, method_alarms, reliability_rows, replay,
                                         score)
from vllm_otel.forecast.detector_config import DetectorConfig  # noqa: E402
from vllm_otel.forecast.failures import FailureCatalog  # noqa: E402
from vllm_otel.forecast.promjson import load_query_range  # noqa: E402

TARGET_FAILURES = ("kv_cache_exhaustion", "queue_overload", "engine_stall")
MIN_RECALL, MIN_PRECISION, MIN_LEAD_S, STALL_SCRAPES = 0.9, 0.8, 30.0, 2


@dataclass
class Recording:
    name: str
    meta: dict[str, Any]
    result: ReplayResult
    rows: list[MethodScore]


def add_recording_args(ap: argparse.ArgumentParser) -> None:
    """--dir, --scenario and --horizon, shared with lead_bound.py."""
    ap.add_argument("--dir", type=Path, default=ROOT / "benchmarks" / "out", help="folder of the recordings")
    ap.add_argument("--scenario", action="append", metavar="NAME", help="only this recording (repeatable)")
    ap.add_argument("--horizon", type=float, default=120.0, help="prediction horizon, s (default 120)")


def recording_paths(folder: Path, scenarios: list[str] | None) -> list[Path]:
    """The recordings in ``folder`` (only ``scenarios`` when given); says why when there are none."""
    paths = sorted(p for p in folder.glob("*.json") if not p.name.endswith(".meta.json"))
    if scenarios:
        paths = [p for p in paths if p.stem in scenarios]
    if not paths:
        print(f"no recordings in {folder}; run benchmarks/record_scenarios.py first", file=sys.stderr)
    return paths


def load(path: Path, args: argparse.Namespace) -> Recording:
    meta_path = path.with_name(path.stem + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    frame = load_query_range(path, step=args.step)
    catalog: dict[str, Any] = {}
    if meta.get("max_num_seqs"):
        catalog["queue_overload"] = {"running_limit": int(meta["max_num_seqs"])}
    if meta.get("memory_limit_bytes"):
        catalog["memory_exhaustion"] = {"process_limit_bytes": float(meta["memory_limit_bytes"])}
    extra = json.loads(args.detector_config) if args.detector_config else {}
    cfg = DetectorConfig(step_s=frame.step_s, horizon_s=args.horizon, catalog=FailureCatalog(**catalog), **extra)
    result = replay(frame, cfg)
    rows = score(result, threshold=args.threshold, baseline_window_s=args.baseline_window,
                 static_fraction=args.static_fraction, hold_s=args.hold)
    return Recording(path.stem, meta, result, rows)


def pooled(recs: list[Recording], args: argparse.Namespace) -> list[MethodScore]:
    """Score all recordings as one fleet: each recording is one unit on a shared relative time grid
    (steps are equal), so recall, precision and the median lead pool every event and alarm."""
    return score(combined(recs), threshold=args.threshold, baseline_window_s=args.baseline_window,
                 static_fraction=args.static_fraction, hold_s=args.hold)


def combined(recs: list[Recording]) -> ReplayResult:
    """All recordings as one fleet's replay (see ``pooled``)."""
    steps = {r.result.step_s for r in recs}
    if len(steps) != 1:
        raise SystemExit(f"recordings have different steps {sorted(steps)}; pass --step")
    step = steps.pop()
    fts = recs[0].result.failure_types
    if any(r.result.failure_types != fts for r in recs):
        raise SystemExit("recordings were scored with different failure types")
    U = sum(len(r.result.units) for r in recs)
    T = max(len(r.result.t) for r in recs)
    F = len(fts)

    def full(shape: tuple[int, ...], fill: Any, dtype: Any = float) -> np.ndarray:
        return np.full(shape, fill, dtype=dtype)

    prob, ttf = full((U, T, F), np.nan, np.float32), full((U, T, F), np.nan, np.float32)
    labels, present = full((U, T, F), False, bool), full((U, T), False, bool)
    signal, thresh = full((U, T, F), np.nan), full((U, T, F), np.nan)
    units: list[str] = []
    u = 0
    for r in recs:
        res, n, k = r.result, len(r.result.units), len(r.result.t)
        for dst, src in ((prob, res.probability), (ttf, res.time_to_failure), (labels, res.labels),
                         (signal, res.signal), (thresh, res.threshold)):
            dst[u:u + n, :k] = src
        present[u:u + n, :k] = res.present
        units += [f"{r.name}:{x}" for x in res.units]
        u += n
    return ReplayResult(np.arange(T) * step, step, recs[0].result.horizon_s, units, fts, prob, ttf,
                        labels, present, signal, thresh)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    br = np.flatnonzero(np.diff(idx) > 1)
    return list(zip(np.r_[idx[0], idx[br + 1]].tolist(), np.r_[idx[br], idx[-1]].tolist()))


def stall_checks(rec: Recording, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per stall (labelled run of engine_stall): when the definition was met, when the detector
    alarmed (p >= threshold, the breach itself counts) relative to it, and relative to the fault."""
    res = rec.result
    if "engine_stall" not in res.failure_types:
        return []
    j = res.failure_types.index("engine_stall")
    scrape = float(rec.meta.get("scrape_interval_s", res.step_s))
    H = int(round(res.horizon_s / res.step_s))
    faults = [f for f in rec.meta.get("faults", []) if f.get("fault") == "sigstop_engine_core"]
    out = []
    for u in range(len(res.units)):
        alarm = res.probability[u, :, j] >= args.threshold
        merge = int(round(60.0 / res.step_s))
        events: list[tuple[int, int]] = []
        for s, e in _runs(res.labels[u, :, j]):
            if events and s - events[-1][1] <= merge + 1:
                events[-1] = (events[-1][0], e)
            else:
                events.append((s, e))
        for onset, end in events:
            t_on = float(res.t[onset])
            # The alarm that covers the onset: walk back from the onset while the alarm is on
            # (an unrelated earlier alarm within the horizon does not count as detecting it).
            k = onset
            while k > max(onset - H, 0) and alarm[k - 1]:
                k -= 1
            first = float(res.t[k]) if alarm[k] else None
            fault = next((f for f in faults if f["start"] - 5 <= t_on <= f["end"] + 30), None)
            row: dict[str, Any] = {"scenario": rec.name, "onset": t_on, "duration_s": float(res.t[end] - t_on),
                                   "first_alarm_minus_onset_s": None if first is None else first - t_on,
                                   "within_2_scrapes": first is not None and first - t_on <= STALL_SCRAPES * scrape}
            if fault is not None:
                k0 = int(np.searchsorted(res.t, fault["start"]))
                after = np.flatnonzero(alarm[k0:])
                row["fault_start"] = fault["start"]
                row["alarm_on_at_fault_start"] = bool(k0 > 0 and alarm[k0 - 1])
                row["first_alarm_after_fault_s"] = (float(res.t[k0 + after[0]] - fault["start"])
                                                    if len(after) else None)
                row["onset_after_fault_s"] = t_on - fault["start"]
            out.append(row)
    return out


def alarms(res: ReplayResult, j: int, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """(U, T) alarm masks per method, exactly as :func:`vllm_otel.forecast.backtest.score` scores them."""
    return method_alarms(res, j, args.threshold, args.baseline_window, args.static_fraction, args.hold)


def event_leads(rec: Recording, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per failure event (target types), each method's *fresh* warning: the length of the alarm run
    that leads without a break into the onset and began after the previous failure had ended.

    The backtest credits an alarm episode that starts within the horizon before the onset and after
    the previous failure ended, even if it stopped again before the onset; this view asks for an
    alarm that is still on at the onset, and it is reported beside the backtest's numbers.
    """
    res = rec.result
    H = int(round(res.horizon_s / res.step_s))
    merge = int(round(60.0 / res.step_s))
    out = []
    for f in TARGET_FAILURES:
        if f not in res.failure_types:
            continue
        j = res.failure_types.index(f)
        al = alarms(res, j, args)
        for u in range(len(res.units)):
            lab = res.labels[u, :, j]
            events: list[tuple[int, int]] = []
            for s, e in _runs(lab):  # the backtest's events: runs closer than 60 s are one
                if events and s - events[-1][1] <= merge + 1:
                    events[-1] = (events[-1][0], e)
                else:
                    events.append((s, e))
            for onset, end in events:
                row: dict[str, Any] = {"scenario": rec.name, "failure_type": f,
                                       "onset_s": float(res.t[onset] - res.t[0])}
                for m in METHODS:
                    k = onset
                    while k > max(onset - H, 0) and al[m][u, k - 1] and not lab[k - 1]:
                        k -= 1
                    row[m] = float(res.t[onset] - res.t[k]) if k < onset else None
                # How long the detector's alarm stays on after the failure ended (an alert that
                # does not resolve pages on, and holds back mitigation verification).
                k = end
                while k + 1 < len(res.t) and al["detector"][u, k + 1]:
                    k += 1
                row["detector_clears_s"] = float(res.t[k] - res.t[end])
                out.append(row)
    return out


def strict_summary(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in TARGET_FAILURES:
        evs = [e for e in events if e["failure_type"] == f]
        for m in METHODS:
            leads = [e[m] for e in evs if e[m] is not None]
            out[(f, m)] = {"events": len(evs), "warned": len(leads),
                           "recall": len(leads) / len(evs) if evs else None,
                           "median_lead_s": float(np.median(leads)) if leads else None}
    return out


# ----------------------------------------------------------------------------------------------
# Targets


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def targets(recs: list[Recording], pool: list[MethodScore], stalls: list[dict[str, Any]],
            events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass/fail on the backtest's numbers; ``also`` gives the fresh-warning view beside them."""
    checks: list[dict[str, Any]] = []
    strict = strict_summary(events)
    by = {(r.failure_type, r.method): r for r in pool}
    for f in TARGET_FAILURES:
        d = by.get((f, "detector"))
        if d is None or not d.events:
            checks.append({"target": f"{f}: occurs in the recordings", "value": "no events", "pass": False})
            continue
        st = strict[(f, "detector")]
        checks.append({"target": f"{f}: recall >= {MIN_RECALL}", "value": _f(d.recall),
                       "pass": d.recall is not None and d.recall >= MIN_RECALL,
                       "also": f"fresh warnings: {st['warned']}/{st['events']}"})
        checks.append({"target": f"{f}: precision >= {MIN_PRECISION}", "value": _f(d.precision),
                       "pass": d.precision is not None and d.precision >= MIN_PRECISION})
        if f == "engine_stall":
            ok = bool(stalls) and all(s["within_2_scrapes"] for s in stalls)
            vals = ", ".join(_f(s["first_alarm_minus_onset_s"], "+.0f") + " s" for s in stalls) or "no stalls"
            checks.append({"target": f"{f}: alarm <= {STALL_SCRAPES} scrapes after the definition is met",
                           "value": f"alarm - onset: {vals}", "pass": ok})
        else:
            checks.append({"target": f"{f}: median lead >= {MIN_LEAD_S:g} s", "value": _f(d.median_lead_s, ".0f"),
                           "pass": d.median_lead_s is not None and d.median_lead_s >= MIN_LEAD_S,
                           "also": f"fresh warnings: median {_f(st['median_lead_s'], '.0f')} s"})
    for rec in recs:
        rows = {(r.failure_type, r.method): r for r in rec.rows}
        for f in TARGET_FAILURES:
            d, p = rows.get((f, "detector")), rows.get((f, "predict_linear"))
            if d is None or p is None or not d.events:
                continue
            f1d, f1p = d.f1 or 0.0, p.f1 or 0.0
            f1_ok = f1d > f1p or f1d == f1p == 1.0
            checks.append({"target": f"{rec.name} / {f}: F1 better than predict_linear",
                           "value": f"{f1d:.2f} vs {f1p:.2f}" + (" (tie at 1.00)" if f1d == f1p == 1.0 else ""),
                           "pass": f1_ok})
            ld, lp = d.median_lead_s, p.median_lead_s
            mine = strict_summary([e for e in events if e["scenario"] == rec.name])
            sd, sp = mine[(f, "detector")], mine[(f, "predict_linear")]
            # Medians over each method's own catches compare different events (one that warns of
            # more failures, some late, can "lose"); the paired view compares the same ones.
            both = [e for e in events if e["scenario"] == rec.name and e["failure_type"] == f
                    and e["detector"] is not None and e["predict_linear"] is not None]
            paired = (f"; on the {len(both)} both warned of: median "
                      f"{np.median([e['detector'] for e in both]):.0f} vs "
                      f"{np.median([e['predict_linear'] for e in both]):.0f} s" if both else "")
            checks.append({"target": f"{rec.name} / {f}: median lead longer than predict_linear",
                           "value": f"{_f(ld, '.0f')} vs {_f(lp, '.0f')} s",
                           "pass": ld is not None and (lp is None or ld > lp),
                           "also": f"fresh warnings: {sd['warned']}/{sd['events']} median {_f(sd['median_lead_s'], '.0f')} s"
                                   f" vs {sp['warned']}/{sp['events']} median {_f(sp['median_lead_s'], '.0f')} s"
                                   + paired})
    return checks


# ----------------------------------------------------------------------------------------------
# Output

COLS = ("scenario", "failure_type", "method", "events", "caught", "recall", "alarms", "precision", "F1",
        "false alarms/h", "quiet time in alarm %", "median lead s")


def table_rows(name: str, rows: list[MethodScore]) -> list[list[str]]:
    keep = {r.failure_type for r in rows if r.events or (r.method == "detector" and r.alarms)}
    out = []
    for r in rows:
        if r.failure_type not in keep:
            continue
        out.append([name, r.failure_type, r.method, str(r.events), str(r.caught), _f(r.recall), str(r.alarms),
                    _f(r.precision), _f(r.f1), f"{r.false_alarms_per_hour:.0f}",
                    _f(None if r.quiet_alarm_share is None else 100 * r.quiet_alarm_share, ".1f"),
                    _f(r.median_lead_s, ".0f")])
    return out


def markdown(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    last: list[str] = []
    for r in rows:
        shown = [("" if i < 2 and last[:i + 1] == r[:i + 1] else c) for i, c in enumerate(r)] if last else r
        lines.append("| " + " | ".join(shown) + " |")
        last = r
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recording_args(ap)
    ap.add_argument("--threshold", type=float, default=0.7, help="alarm probability (default 0.7)")
    ap.add_argument("--baseline-window", type=float, default=300.0, help="predict_linear lookback, s (default 300)")
    ap.add_argument("--static-fraction", type=float, default=0.8, help="static threshold fraction (default 0.8)")
    ap.add_argument("--step", type=float, help="resample to S seconds (default: the recording's 1 s)")
    ap.add_argument("--hold", type=float, default=0.0, metavar="S", help="keep every method's alarms on S s "
                    "after they stop, as an alert rule with keep_firing_for: S pages (default 0)")
    ap.add_argument("--detector-config", metavar="JSON", help='more DetectorConfig fields, e.g. '
                    '\'{"use_capacity": false}\' (without the offered-load model, on by default)')
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (for the README)")
    ap.add_argument("--json", action="store_true", help="print everything as JSON")
    args = ap.parse_args()

    paths = recording_paths(args.dir, args.scenario)
    if not paths:
        return 2
    recs = [load(p, args) for p in paths]
    pool = pooled(recs, args)
    # pooled over the fleet; the reliability bins only for the failures the targets are about
    cals = calibration(combined(recs), threshold=args.threshold)
    cal_header, cal_rows = calibration_rows(cals, args.threshold)
    rel_header, rel_rows = reliability_rows([c for c in cals if c.failure_type in TARGET_FAILURES])
    stalls = [s for r in recs for s in stall_checks(r, args)]
    events = [e for r in recs for e in event_leads(r, args)]
    checks = targets(recs, pool, stalls, events)

    if args.json:
        json.dump({"params": {k: getattr(args, k) for k in ("threshold", "horizon", "baseline_window",
                                                            "static_fraction", "step", "hold")},
                   "scenarios": {r.name: {"meta": r.meta, "scores": [asdict(x) for x in r.rows]} for r in recs},
                   "pooled": [asdict(x) for x in pool], "calibration": [asdict(c) for c in cals],
                   "stalls": stalls, "events": events,
                   "targets": checks},
                  sys.stdout, indent=2, default=str)
        print()
        return 0

    rows = [row for r in recs for row in table_rows(r.name, r.rows)] + table_rows("all (pooled)", pool)
    ev_cols = ("scenario", "failure_type", "onset s", *(f"{m} warning s" for m in METHODS),
               "detector alarm after the end s")
    ev_rows = [[e["scenario"], e["failure_type"], f"{e['onset_s']:.0f}", *(_f(e[m], ".0f") for m in METHODS),
                _f(e["detector_clears_s"], ".0f")] for e in events]
    if args.markdown:
        print(markdown(COLS, rows))
        print()
        print(markdown(ev_cols, ev_rows))
        print()
        print(markdown(cal_header, cal_rows))
        print()
        print(CALIBRATION_LEGEND)
        print()
        print(markdown(rel_header, rel_rows))
        print()
        print(markdown(("target", "backtest value", "result", "fresh-warning view"),
                       [[c["target"], c["value"], "pass" if c["pass"] else "**FAIL**", c.get("also", "")]
                        for c in checks]))
        return 0

    console = Console(width=160)
    t = Table(title=f"backtest of recorded scenarios: alarm at p >= {args.threshold:g}"
                    + (f" held {args.hold:g} s" if args.hold else "") + f", horizon {args.horizon:g} s, "
                    f"predict_linear over {args.baseline_window:g} s, static at {args.static_fraction:g} x threshold")
    for c in COLS:
        t.add_column(c, justify="left" if c in COLS[:3] else "right", no_wrap=True)
    last = None
    for row in rows:
        if last is not None and row[0] != last:
            t.add_section()
        t.add_row(*row, style="bold" if row[2] == "detector" else None)
        last = row[0]
    console.print(t)
    if stalls:
        st = Table(title="stalls: alarm time relative to the definition (tokens flat 20 s) and to the SIGSTOP")
        for c in ("scenario", "stall lasted", "alarm - onset", "alarm - SIGSTOP", "onset - SIGSTOP", "alarm already on"):
            st.add_column(c, justify="right")
        for s in stalls:
            st.add_row(s["scenario"], f"{s['duration_s']:.0f} s", _f(s["first_alarm_minus_onset_s"], "+.0f"),
                       _f(s.get("first_alarm_after_fault_s"), ".0f"), _f(s.get("onset_after_fault_s"), ".0f"),
                       str(s.get("alarm_on_at_fault_start", "-")))
        console.print(st)
    et = Table(title="fresh warnings per failure event: seconds the alarm run leading into the onset had been on "
                     "(begun after any earlier failure ended; - = no warning before the onset)")
    for c in ev_cols:
        et.add_column(c, justify="left" if c in ev_cols[:2] else "right")
    for r in ev_rows:
        et.add_row(*r)
    console.print(et)
    for title, header, body in (
            ("pooled: can the detector be taken at its word? (steps with no failure under way; outcome: an onset "
             "within the horizon)", cal_header, cal_rows),
            ("pooled reliability: steps binned by the detector's probability, the share followed by an onset",
             rel_header, rel_rows)):
        ct = Table(title=title)
        for c in header:
            ct.add_column(c, justify="left" if c == "failure_type" else "right")
        for r in body:
            ct.add_row(*r)
        console.print(ct)
        if header is cal_header:
            console.print(CALIBRATION_LEGEND)
    tt = Table(title="targets (pass/fail on the backtest's numbers)")
    for c in ("target", "backtest value", "result", "fresh-warning view"):
        tt.add_column(c)
    for c in checks:
        tt.add_row(c["target"], c["value"], "[green]pass[/]" if c["pass"] else "[red]FAIL[/]", c.get("also", ""))
    console.print(tt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
