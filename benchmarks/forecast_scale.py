"""Scale of one forecasting cycle: N instances x 6 forecast signals x 720 points (synthetic), time and memory.

A *cold* cycle is what a freshly started forecaster does with a query_range answer: ingest the
whole 720-point history of every instance (state updates only), then predict every failure type
for every instance, then spend the refit budget. A *warm* cycle is the steady state: one new point
per instance, predict, refit within the budget. *Parse* is the step before a warm cycle in
production: one query_range answer holding one new point of every raw series (31 per instance:
gauges, counters and the TTFT histogram's buckets) as JSON text, to the arrays the detector takes.
*Service* is one more warm cycle through the forecaster service (predictions taken, snapshot
published, refits within the budget), and */metrics* one exposition of everything it publishes.
Each size runs in a fresh process, so its peak resident memory is its own.

    python benchmarks/forecast_scale.py [--sizes 1700 3400 5000] [--points 720] [--refit-budget 2.0]
                                        [--shards N] [--profile] [--detector-config JSON]...

After the table: the cost per added series (least-squares slope over the sizes). ``--shards N``
then runs the largest size split over N forecaster processes side by side (``--shard K/N``, the
stable hash of the instance label), each on its own share, and prints each one's cycle and memory.
``--profile`` then splits the largest size's ingest by part of the detector step (cProfile).
Each ``--detector-config`` adds a run of every size with those DetectorConfig settings (a
side-by-side cost of an option, e.g. ``'{"use_capacity": false}'``); none: the defaults.

Target (issue 26): 30,000 series (5,000 instances) per cycle within 15 s cold on 2 cores, < 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any


def _frame(names: list[str], points: int):  # -> RawFrame, filled one instance at a time
    import numpy as np

    from vllm_otel.forecast.promjson import RawFrame
    from vllm_otel.forecast.synthetic import SCENARIOS, TTFT_BUCKETS, scenario

    n = len(names)
    values: dict[str, np.ndarray] = {}
    hist = None
    for u, name in enumerate(names):
        i = int(name.split("-")[1])
        for key, arr in scenario(SCENARIOS[i % len(SCENARIOS)], points, seed=i).items():
            if key == "ttft":
                if hist is None:
                    hist = np.full((n, points, arr.shape[1]), np.nan)
                hist[u] = arr
            else:
                values.setdefault(key, np.full((n, points), np.nan))[u] = arr
    hists = {"ttft": (np.array(TTFT_BUCKETS + (np.inf,)), hist)}
    return RawFrame(1_700_000_000.0 + 5.0 * np.arange(points), 5.0, names, list(names), values, hists)


def _parse_one_point(names: list[str]) -> float:
    """Seconds from one query_range answer (one new point of every raw series, JSON text) to a RawFrame."""
    from vllm_otel.forecast.promjson import parse_query_range
    from vllm_otel.forecast.synthetic import SCENARIOS, scenario, to_query_range

    body = to_query_range({n: scenario(SCENARIOS[int(n.split("-")[1]) % len(SCENARIOS)], 1,
                                       seed=int(n.split("-")[1])) for n in names})
    text = json.dumps(body)
    del body
    t0 = time.perf_counter()
    frame = parse_query_range(json.loads(text))
    elapsed = time.perf_counter() - t0
    assert len(frame.units) == len(names)
    return elapsed


def _publish(det: Any, frame: Any, k: int, refit_budget: float) -> tuple[float, float]:
    """One warm cycle through the forecaster service with ``det`` (one new point, predictions
    taken, the snapshot published; refits within the budget), then one /metrics exposition."""
    from prometheus_client import generate_latest

    from vllm_otel.forecast.promjson import RawFrame
    from vllm_otel.forecast.service import ForecasterService
    from vllm_otel.forecast.sources import Batch

    point = RawFrame(frame.t[k:k + 1], frame.step_s, frame.units, frame.instances,
                     {name: arr[:, k:k + 1] for name, arr in frame.values.items()},
                     {name: (les, c[:, k:k + 1]) for name, (les, c) in frame.histograms.items()})

    class OnePoint:
        kind, timeout = "benchmark", 5.0

        def fetch(self, now: float) -> Batch:
            return Batch(point, {}, now)

        def close(self) -> None:
            pass

    svc = ForecasterService(OnePoint(), det.config.model_copy(update={"refit_time_budget_s": refit_budget}),
                            clock=lambda: float(frame.t[k]))
    svc.detector = det                      # warm: the detector that ingested the history
    svc._last_step_t = float(frame.t[k - 1])
    t0 = time.perf_counter()
    report = svc.run_cycle()
    service_s = time.perf_counter() - t0
    assert report.ok and report.units == len(frame.units), report
    t0 = time.perf_counter()
    body = generate_latest(svc.registry)
    exposition_s = time.perf_counter() - t0
    assert body.count(b"vllm_otel_failure_probability{") >= len(frame.units)
    return service_s, exposition_s


def _one(n: int, points: int, refit_budget: float, extra: dict | None = None,
         shard: tuple[int, int] | None = None) -> dict[str, float]:
    import numpy as np

    from vllm_otel.forecast.detector import PredictiveFailureDetector
    from vllm_otel.forecast.detector_config import DetectorConfig
    from vllm_otel.forecast.promjson import in_shard

    names = [f"inst-{i:05d}" for i in range(n) if in_shard(f"inst-{i:05d}", shard)]
    t0 = time.perf_counter()
    frame = _frame(names, points + 2)
    gen_s = time.perf_counter() - t0
    parse_s = _parse_one_point(names)

    det = PredictiveFailureDetector(DetectorConfig(step_s=frame.step_s, refit_time_budget_s=refit_budget,
                                                   max_refits_per_step=10_000, **(extra or {})))
    units = frame.units
    t0 = time.perf_counter()
    for k in range(points - 1):
        values, hists = frame.at(k)
        det.step(float(frame.t[k]), units, values, hists, predict=False, refit=False)
    ingest_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    values, hists = frame.at(points - 1)
    res = det.step(float(frame.t[points - 1]), units, values, hists, refit=False)
    predict_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    refits = det._refit(float(frame.t[points - 1]))
    refit_s = time.perf_counter() - t2
    cold_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    values, hists = frame.at(points)
    res = det.step(float(frame.t[points]), units, values, hists, refit=False)
    warm_predict_s = time.perf_counter() - t0
    assert res is not None and res.probability.shape[0] == len(names)
    service_s, exposition_s = _publish(det, frame, points + 1, refit_budget)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"instances": len(names), "series": len(names) * 6, "points": points, "generate_s": gen_s,
            "parse_s": parse_s, "cold_ingest_s": ingest_s, "cold_predict_s": predict_s, "cold_refit_s": refit_s,
            "cold_refits": refits, "cold_cycle_s": cold_s, "warm_cycle_s": warm_predict_s + refit_s,
            "warm_predict_s": warm_predict_s, "service_s": service_s, "exposition_s": exposition_s,
            "predictions": int(np.isfinite(res.probability).sum()),
            "peak_rss_mib": rss_mib}


def _profile(n: int, steps: int = 120) -> None:
    """Where ingest time goes: cProfile over ``steps`` history steps of ``n`` instances, grouped
    by the part of the detector step (milliseconds per step, under the profiler)."""
    import cProfile
    import pstats

    from vllm_otel.forecast.detector import PredictiveFailureDetector
    from vllm_otel.forecast.detector_config import DetectorConfig

    frame = _frame([f"inst-{i:05d}" for i in range(n)], steps)
    det = PredictiveFailureDetector(DetectorConfig(step_s=frame.step_s))
    inputs = [frame.at(k) for k in range(steps)]
    for k in range(20):  # past the first steps' growth of state
        det.step(float(frame.t[k]), frame.units, *inputs[k], predict=False, refit=False)
    prof = cProfile.Profile()
    prof.enable()
    for k in range(20, steps):
        det.step(float(frame.t[k]), frame.units, *inputs[k], predict=False, refit=False)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def cum(module: str, fn: str) -> float:
        return sum(v[3] for k, v in stats.items() if k[0].endswith(module) and k[2] == fn)

    total = cum("detector.py", "step")
    parts = {
        "signals (counters, windows, TTFT quantile)": cum("signals.py", "update"),
        "forecast state updates (one bank per signal)": cum("statespace.py", "update"),
        "memory-slope precursor": cum("memory.py", "probability"),
        "stall and offered-load models": cum("stall.py", "observe") + cum("offered_load.py", "observe"),
        "health states, graph, failure checks": (cum("stategraph.py", "classify") + cum("stategraph.py", "observe")
                                                 + cum("failures.py", "breached")),
    }
    parts["rest of the step"] = total - sum(parts.values())
    per = 1000.0 / (steps - 20)
    print(f"\ningest of {n} instances, ms per history step (cProfile, {steps - 20} steps): {total * per:.1f}")
    for name, v in parts.items():
        print(f"  {name:<46} {v * per:6.2f}  {100 * v / total:5.1f} %")


def _cmd(n: int, args: argparse.Namespace, conf: str | None, shard: str | None = None) -> list[str]:
    return ([sys.executable, __file__, "--one", str(n), "--points", str(args.points),
             "--refit-budget", str(args.refit_budget)] + (["--detector-config", conf] if conf else [])
            + (["--shard", shard] if shard else []))


HEADER = (f"{'config':>24} {'instances':>9} {'series':>7} {'parse s':>8} {'ingest s':>9} {'predict s':>9} "
          f"{'refit s':>8} {'refits':>6} {'cold s':>7} {'warm s':>7} {'warm pred ms':>12} {'service s':>9} {'/metrics s':>10} {'peak MiB':>9}")


def _row(label: str, r: dict) -> str:
    return (f"{label[:24]:>24} {r['instances']:>9} {r['series']:>7} {r['parse_s']:>8.2f} {r['cold_ingest_s']:>9.2f} "
            f"{r['cold_predict_s']:>9.3f} {r['cold_refit_s']:>8.2f} {r['cold_refits']:>6} "
            f"{r['cold_cycle_s']:>7.2f} {r['warm_cycle_s']:>7.2f} {1000 * r['warm_predict_s']:>12.1f} "
            f"{r['service_s']:>9.2f} {r['exposition_s']:>10.2f} {r['peak_rss_mib']:>9.0f}")


def _slope(rows: list[dict], key: str) -> float:
    import numpy as np

    x = np.array([r["series"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    return float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1700, 3400, 5000])
    ap.add_argument("--points", type=int, default=720)
    ap.add_argument("--refit-budget", type=float, default=2.0, help="seconds of statsmodels fits per cycle")
    ap.add_argument("--shards", type=int, default=0, help="then run the largest size as N shard processes at once")
    ap.add_argument("--profile", action="store_true", help="then profile the largest size's ingest by part")
    ap.add_argument("--detector-config", action="append", metavar="JSON",
                    help="DetectorConfig settings for one run of every size (repeatable; default: none)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size, JSON out
    ap.add_argument("--shard", help=argparse.SUPPRESS)          # child mode: only this K/N shard
    args = ap.parse_args()
    if args.one:
        from vllm_otel.forecast.promjson import parse_shard

        extra = json.loads(args.detector_config[0]) if args.detector_config else None
        shard = parse_shard(args.shard) if args.shard else None
        print(json.dumps(_one(args.one, args.points, args.refit_budget, extra, shard)))
        return 0
    configs = args.detector_config or [None]
    print(HEADER)
    results: dict[str | None, list[dict]] = {c: [] for c in configs}
    for n in args.sizes:
        for conf in configs:  # sizes outer, configs inner: a comparison runs side by side
            out = subprocess.run(_cmd(n, args, conf), capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[conf].append(r)
            print(_row(conf or "defaults", r), flush=True)
    for conf, rows in results.items():
        if len(rows) > 1:
            print(f"{conf or 'defaults'}: per added series: cold {1000 * _slope(rows, 'cold_cycle_s'):.3f} ms "
                  f"(ingest {1000 * _slope(rows, 'cold_ingest_s'):.3f} ms), warm predict "
                  f"{1000 * _slope(rows, 'warm_predict_s'):.4f} ms, parse {1000 * _slope(rows, 'parse_s'):.4f} ms, "
                  f"memory {1024 * _slope(rows, 'peak_rss_mib'):.1f} KiB")
    if args.shards > 1:
        n, N = max(args.sizes), args.shards
        t0 = time.perf_counter()
        procs = [subprocess.Popen(_cmd(n, args, configs[0], f"{k}/{N}"), stdout=subprocess.PIPE, text=True)
                 for k in range(1, N + 1)]
        outs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            raise SystemExit("a shard process failed")
        shard_rows = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        print(f"\n{n} instances as {N} shard processes side by side (wall {wall:.1f} s, "
              f"including data generation):")
        print(HEADER)
        for k, r in enumerate(shard_rows, 1):
            print(_row(f"shard {k}/{N}", r))
        covered = sum(r["instances"] for r in shard_rows)
        print(f"instances covered: {covered} of {n}; slowest cold cycle "
              f"{max(r['cold_cycle_s'] for r in shard_rows):.2f} s; memory together "
              f"{sum(r['peak_rss_mib'] for r in shard_rows):.0f} MiB")
    if args.profile:
        _profile(max(args.sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
