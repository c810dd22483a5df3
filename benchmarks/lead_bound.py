"""How much warning is in the recorded series at all: the best threshold rule, chosen in hindsight.

For each failure type the recordings contain, this script tries every rule "alarm while
feature >= c" and "alarm while feature <= c" (shown as ``-feature``), and with ``--pairs``
"feature_a >= a and feature_b >= b" for every pair, on the recorded scenarios
(``benchmarks/out/``, from ``record_scenarios.py``), pooled as one fleet. It scores each rule
exactly as the backtest scores the detector (``vllm_otel.forecast.backtest``: an event is caught
by an alarm episode that starts within the horizon before its onset and after the previous
failure ended; an alarm is false when no failure is under way or follows within the horizon).
It prints, per feature, the longest median lead that any threshold reaches with recall >= 0.9
and precision >= 0.8 (the issue's targets), and what precision a threshold pays for a 30 s lead.

The thresholds are picked with the whole recording in view, so each number is an upper bound
for a causal rule on that feature (a rule that learns its threshold while it runs can at best
find the same one); the detector's own row is printed beside them for comparison. ``--learned S``
adds a model of all features together: a logistic regression of "a failure begins within S
seconds", fitted for each recording on the others (out of sample), its alarm level again picked
in hindsight. With ``--holdout scenario`` it is fitted only on recordings of *other* scenarios
(``scenario`` in the .meta.json, a ``_slow`` variant counted with its base): repeated recordings
of one scenario are near copies of each other (same engine, same cache, same trace, same load
shape), so leaving out only the recording itself measures how well a model remembers the
scenario, not whether what it learned carries to another deployment.

Features are computed causally at each step from the raw series (10 s windows; slopes over 30 s):

    kv_usage        mean vllm:kv_cache_usage_perc (kv_usage_now: the newest sample, as the static baseline)
    occupancy       mean running + waiting
    waiting         mean vllm:num_requests_waiting
    arrivals        requests that entered: finished + change in running + waiting, per second
    prompt_tps      prompt tokens per second
    generation_tps  generated tokens per second
    itl             mean inter-token latency (the engine's step time)
    ttft            mean time to first token of requests that got it in the window
    queue_time      mean time requests waited before they were scheduled
    iteration_tokens mean tokens per engine step
    d_<feature>     least-squares slope over the last 30 s (per second)

    .venv/bin/python benchmarks/lead_bound.py [--dir benchmarks/out] [--scenario NAME]... [--pairs]
                                              [--learned S [--holdout scenario]] [--cut-from-phase swell]
                                              [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from score_scenarios import add_recording_args, load, recording_paths  # noqa: E402

from vllm_otel.forecast.backtest import predict_linear, score_alarms  # noqa: E402

TARGET_FAILURES = ("kv_cache_exhaustion", "queue_overload")
MIN_RECALL, MIN_PRECISION, MIN_LEAD_S = 0.9, 0.8, 30.0
WINDOW_S, SLOPE_S = 10.0, 30.0

# (feature, metric, how): "gauge" = window mean; "rate" = counter increase per second;
# "mean" = increase of <name>_sum over increase of <name>_count
RAW = (
    ("kv_usage", "vllm:kv_cache_usage_perc", "gauge"),
    ("waiting", "vllm:num_requests_waiting", "gauge"),
    ("prompt_tps", "vllm:prompt_tokens_total", "rate"),
    ("generation_tps", "vllm:generation_tokens_total", "rate"),
    ("itl", "vllm:inter_token_latency_seconds", "mean"),
    ("ttft", "vllm:time_to_first_token_seconds", "mean"),
    ("queue_time", "vllm:request_queue_time_seconds", "mean"),
    ("iteration_tokens", "vllm:iteration_tokens_total", "mean"),
)
SLOPED = ("kv_usage", "occupancy", "arrivals", "prompt_tps", "itl")


def _series(path: Path, t: np.ndarray) -> dict[str, np.ndarray]:
    """Metric name -> values on the replay's grid, summed over the series of that name (one
    instance per recording: the recorder's)."""
    data = json.loads(path.read_text())["data"]["result"]
    step = float(t[1] - t[0]) if len(t) > 1 else 1.0
    out: dict[str, np.ndarray] = {}
    for entry in data:
        name = entry["metric"]["__name__"]
        if name.endswith("_bucket") or name.endswith("_created"):
            continue
        arr = out.setdefault(name, np.full(len(t), np.nan))
        for ts, v in entry["values"]:
            k = int(round((float(ts) - t[0]) / step))
            if 0 <= k < len(t):
                val = float(v)
                arr[k] = val if np.isnan(arr[k]) else arr[k] + val
    return out


def _window_diff(x: np.ndarray, n: int) -> np.ndarray:
    """x[k] - x[k - n], NaN where either is unknown."""
    out = np.full_like(x, np.nan)
    out[n:] = x[n:] - x[:-n]
    return out


def _window_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last ``n`` samples, NaN where fewer than half of them are known."""
    ok = np.isfinite(x)
    c_sum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    c_n = np.concatenate([[0], np.cumsum(ok)])
    k = np.arange(len(x))
    lo = np.maximum(k - n + 1, 0)
    count = c_n[k + 1] - c_n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (c_sum[k + 1] - c_sum[lo]) / count
    return np.where((k >= n - 1) & (count >= n // 2), mean, np.nan)


def _slope(x: np.ndarray, n: int) -> np.ndarray:
    """Least-squares slope (per sample) over the last ``n`` samples, as ``predict_linear`` fits
    it; NaN where fewer than half of them are known."""
    k = np.arange(len(x), dtype=float)
    line = lambda ahead: predict_linear(x[None, :], k, float(n), ahead)[0]  # noqa: E731
    known = _window_mean(np.where(np.isfinite(x), 0.0, np.nan), n)      # finite where half are known
    return np.where(np.isfinite(known), line(1.0) - line(0.0), np.nan)


def features(raw: dict[str, np.ndarray], step: float) -> dict[str, np.ndarray]:
    """The features above, each (T,), computed from data up to each step only."""
    n, ns = max(1, int(round(WINDOW_S / step))), max(2, int(round(SLOPE_S / step)))
    nan = np.full(len(next(iter(raw.values()))), np.nan)
    out: dict[str, np.ndarray] = {}
    for name, metric, how in RAW:
        if how == "gauge":
            out[name] = _window_mean(raw.get(metric, nan), n)
        elif how == "rate":
            out[name] = _window_diff(raw.get(metric, nan), n) / (n * step)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = (_window_diff(raw.get(metric + "_sum", nan), n)
                             / _window_diff(raw.get(metric + "_count", nan), n))
    out["kv_usage_now"] = raw.get("vllm:kv_cache_usage_perc", nan)
    running, waiting = raw.get("vllm:num_requests_running", nan), raw.get("vllm:num_requests_waiting", nan)
    out["occupancy"] = _window_mean(running + waiting, n)
    finished = raw.get("vllm:request_success_total", nan)
    out["arrivals"] = _window_diff(finished + running + waiting, n) / (n * step)
    for name in SLOPED:
        out["d_" + name] = _slope(out[name], ns) / step
    return out


def sweep(feature: np.ndarray, labels: np.ndarray, t: np.ndarray, horizon: int, merge_gap: int,
          levels: np.ndarray, f: str, present: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Score "alarm while feature >= c" for every level c. feature, labels, present: (U, T)."""
    rows = []
    for c in levels:
        with np.errstate(invalid="ignore"):
            alarm = (feature >= c) | labels
        s = score_alarms(f, "rule", alarm, labels, t, horizon, merge_gap, 1.0, present)
        rows.append({"level": float(c), "recall": s.recall or 0.0, "precision": s.precision or 0.0,
                     "lead": s.median_lead_s, "alarms": s.alarms, "false": s.false_alarms,
                     "quiet_share": s.quiet_alarm_share})
    return rows


def scenario_of(rec_name: str, meta: dict[str, Any]) -> str:
    """The scenario a recording was made from (its ``_slow`` variant counted with it)."""
    name = str(meta.get("scenario") or rec_name)
    return name[:-len("_slow")] if name.endswith("_slow") else name


def learned(feats: dict[str, np.ndarray], labels: np.ndarray, window: int,
            groups: list[str] | None = None) -> np.ndarray:
    """P(a failure begins within ``window`` steps) at every step of every recording, from a
    logistic regression on all features (standardised, ridge-penalised) fitted on the *other*
    recordings: out of sample, so no level is learned from the recording it is scored on. With
    ``groups`` (one key per recording), every recording of the same group is left out too.
    (U, T); NaN where a feature is unknown, or where nothing was left to learn from."""
    import statsmodels.api as sm

    X = np.stack(list(feats.values()), axis=2)                      # (U, T, F)
    # features the recordings do not carry (all unknown) are left out rather than voiding every step
    X = X[:, :, np.isfinite(X).any(axis=(0, 1))]
    U, T, _ = X.shape
    onset = labels & ~np.concatenate([np.zeros((U, 1), dtype=bool), labels[:, :-1]], axis=1)
    y = np.zeros((U, T), dtype=bool)
    for u, k in zip(*np.nonzero(onset)):
        y[u, max(0, k - window):k] = True
    P = np.full((U, T), np.nan)
    for hold in range(U):
        train = np.arange(U) != hold
        if groups is not None:
            train &= np.array([g != groups[hold] for g in groups])
        Xt, yt = X[train].reshape(-1, X.shape[2]), y[train].reshape(-1)
        ok = np.isfinite(Xt).all(axis=1) & ~labels[train].reshape(-1)   # failing steps teach nothing
        if not train.any() or not yt[ok].any():
            continue
        mu, sd = Xt[ok].mean(axis=0), Xt[ok].std(axis=0) + 1e-9
        fit = sm.GLM(yt[ok].astype(float), np.column_stack([np.ones(ok.sum()), (Xt[ok] - mu) / sd]),
                     family=sm.families.Binomial()).fit_regularized(alpha=0.01, L1_wt=0.0)
        known = np.isfinite(X[hold]).all(axis=1)
        P[hold, known] = fit.predict(np.column_stack([np.ones(known.sum()), (X[hold][known] - mu) / sd]))
    return P


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rule with the longest median lead among those meeting the recall and precision targets."""
    ok = [r for r in rows if r["recall"] >= MIN_RECALL and r["precision"] >= MIN_PRECISION and r["lead"] is not None]
    return max(ok, key=lambda r: (r["lead"], r["precision"])) if ok else None


def best_at_lead(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rule with the best precision among those meeting the recall and lead targets."""
    ok = [r for r in rows if r["recall"] >= MIN_RECALL and (r["lead"] or 0) >= MIN_LEAD_S]
    return max(ok, key=lambda r: (r["precision"], r["lead"])) if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recording_args(ap)
    ap.add_argument("--levels", type=int, default=200, help="thresholds tried per feature (quantiles)")
    ap.add_argument("--pairs", action="store_true", help="also every pair of features (AND), 30 levels each")
    ap.add_argument("--learned", type=float, metavar="S", help="also a logistic regression on all features, "
                    "fitted on the other recordings, of 'a failure begins within S seconds'")
    ap.add_argument("--holdout", choices=("recording", "scenario"), default="recording",
                    help="with --learned, leave out of the fit only the recording scored (default) or "
                         "every recording of its scenario")
    ap.add_argument("--cut-from-phase", metavar="PHASE", help="leave out each recording from the start "
                    "of this phase of its .meta.json on (e.g. swell: the bound without the false-alarm test)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    paths = recording_paths(args.dir, args.scenario)
    if not paths:
        return 2
    ns = argparse.Namespace(step=None, detector_config=None, horizon=args.horizon, threshold=0.7,
                            baseline_window=300.0, static_fraction=0.8, hold=0.0)
    recs = [load(p, ns) for p in track(paths, description="replaying", transient=True)]
    for r in recs:
        if len(r.result.units) != 1:
            print(f"{r.name}: {len(r.result.units)} instances; this script expects one per recording",
                  file=sys.stderr)
            return 2
    step = recs[0].result.step_s
    T = max(len(r.result.t) for r in recs)
    horizon, merge_gap = int(round(args.horizon / step)), int(round(60.0 / step))
    t = np.arange(T) * step
    feats: dict[str, np.ndarray] = {}
    cut = np.zeros((len(recs), T), dtype=bool)
    for i, (r, p) in enumerate(zip(recs, paths)):
        cut[i, len(r.result.t):] = True
        starts = [ph["start"] for ph in r.meta.get("phases", []) if ph.get("phase") == args.cut_from_phase]
        if starts:
            cut[i, :len(r.result.t)] = r.result.t >= min(starts)
        for name, x in features(_series(p, r.result.t), step).items():
            feats.setdefault(name, np.full((len(recs), T), np.nan))[i, :len(x)] = x
    for x in feats.values():
        x[cut] = np.nan
    fts = recs[0].result.failure_types
    report: dict[str, Any] = {"recordings": [r.name for r in recs], "horizon_s": args.horizon,
                              "cut_from_phase": args.cut_from_phase, "failures": {}}
    for f in TARGET_FAILURES:
        j = fts.index(f)
        labels = np.zeros((len(recs), T), dtype=bool)
        prob = np.full((len(recs), T), np.nan)
        for i, r in enumerate(recs):
            labels[i, :len(r.result.t)] = r.result.labels[0, :, j]
            prob[i, :len(r.result.t)] = r.result.probability[0, :, j]
        labels &= ~cut
        prob[cut] = np.nan
        if not labels.any():
            continue
        present = ~cut
        det = score_alarms(f, "detector", (prob >= 0.7) | labels, labels, t, horizon, merge_gap, 1.0, present)
        per: dict[str, Any] = {"detector": {"recall": det.recall, "precision": det.precision,
                                            "lead": det.median_lead_s, "alarms": det.alarms,
                                            "events": det.events, "quiet_share": det.quiet_alarm_share},
                               "features": {}, "pairs": []}
        for name, x in feats.items():
            # Both directions: "feature >= c", and "feature <= c" as "-feature >= -c" (a falling
            # throughput or slope could lead a failure as well as a rising one).
            for sign, label in ((1.0, name), (-1.0, "-" + name)):
                y = sign * x
                levels = np.unique(np.nanquantile(y, np.linspace(0, 1, args.levels))) if np.isfinite(y).any() else []
                rows = sweep(y, labels, t, horizon, merge_gap, np.asarray(levels), f, present)
                per["features"][label] = {"best": best(rows), "at_30s": best_at_lead(rows)}
        if args.learned:
            with np.errstate(all="ignore"):
                groups = ([scenario_of(r.name, r.meta) for r in recs] if args.holdout == "scenario" else None)
                P = learned(feats, labels, int(round(args.learned / step)), groups)
            levels = np.unique(np.nanquantile(P, np.linspace(0, 1, args.levels))) if np.isfinite(P).any() else []
            rows = sweep(P, labels, t, horizon, merge_gap, np.asarray(levels), f, present)
            per["learned"] = {"window_s": args.learned, "holdout": args.holdout,
                              "scored_recordings": int((np.isfinite(P).any(axis=1) & labels.any(axis=1)).sum()),
                              "best": best(rows), "at_30s": best_at_lead(rows),
                              # fixed levels, as a deployed model would have to use
                              "fixed": sweep(P, labels, t, horizon, merge_gap, np.array([0.5, 0.7]), f, present)}
        if args.pairs:
            names = list(feats)
            pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
            for a, b in track(pairs, description=f"{f}: pairs", transient=True):
                la = np.unique(np.nanquantile(feats[a], np.linspace(0, 1, 30)))
                lb = np.unique(np.nanquantile(feats[b], np.linspace(0, 1, 30)))
                cands = []
                for ca in la:
                    with np.errstate(invalid="ignore"):
                        x = np.where(feats[a] >= ca, feats[b], np.nan)
                    cands += [dict(r, level_a=float(ca))
                              for r in sweep(x, labels, t, horizon, merge_gap, lb, f, present)]
                hit = best(cands)
                per["pairs"].append({"a": a, "b": b, "best": hit, "at_30s": best_at_lead(cands)})
            per["pairs"].sort(key=lambda p: -(p["best"]["lead"] if p["best"] else -1))
        report["failures"][f] = per

    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    console = Console(width=150)
    console.print(f"recordings: {', '.join(report['recordings'])} (pooled); horizon {args.horizon:g} s; "
                  f"targets recall >= {MIN_RECALL}, precision >= {MIN_PRECISION}, median lead >= {MIN_LEAD_S:g} s")

    def fmt(r: dict[str, Any] | None, level_key: str = "level") -> list[str]:
        if not r:
            return ["-", "-", "-", "-", "-"]
        lvl = f"{r[level_key]:.3g}" if level_key in r else "-"
        quiet = "-" if r.get("quiet_share") is None else f"{100 * r['quiet_share']:.0f}"
        return [lvl, f"{r['recall']:.2f}", f"{r['precision']:.2f}", quiet,
                f"{r['lead']:.0f}" if r["lead"] is not None else "-"]

    for f, per in report["failures"].items():
        d = per["detector"]
        tb = Table(title=f"{f}: {d['events']} events; detector: recall {d['recall']:.2f}, precision "
                         f"{d['precision']:.2f}, quiet time in alarm {100 * (d['quiet_share'] or 0):.0f} %, "
                         f"median lead {d['lead']} s")
        for c in ("feature", "best level", "recall", "precision", "quiet %", "median lead s",
                  "level for 30 s", "recall", "precision", "quiet %", "median lead s"):
            tb.add_column(c, justify="left" if c == "feature" else "right")
        items = sorted(per["features"].items(), key=lambda kv: -(kv[1]["best"]["lead"] if kv[1]["best"] else -1))
        for name, v in items:
            tb.add_row(name, *fmt(v["best"]), *fmt(v["at_30s"]))
        console.print(tb)
        if "learned" in per:
            lr = per["learned"]
            tl = Table(title=f"{f}: logistic regression on all features, out of sample (P of an onset "
                             f"within {lr['window_s']:g} s; fitted without the scored {lr['holdout']}; "
                             f"{lr['scored_recordings']} recordings with events had a model)")
            for c in ("", "P level", "recall", "precision", "quiet %", "median lead s"):
                tl.add_column(c, justify="left" if not c else "right")
            tl.add_row("best meeting recall and precision", *fmt(per["learned"]["best"]))
            tl.add_row("best precision at a 30 s lead", *fmt(per["learned"]["at_30s"]))
            for row in lr["fixed"]:
                tl.add_row(f"at P >= {row['level']:g}", *fmt(row))
            console.print(tl)
        if per["pairs"]:
            tp = Table(title=f"{f}: best pairs (alarm while a >= level_a and b >= level_b)")
            for c in ("a", "b", "level a", "level b", "recall", "precision", "quiet %", "median lead s"):
                tp.add_column(c, justify="left" if c in ("a", "b") else "right")
            for p in per["pairs"][:8]:
                r = p["best"]
                if r:
                    tp.add_row(p["a"], p["b"], f"{r['level_a']:.3g}", *fmt(r))
            console.print(tp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
