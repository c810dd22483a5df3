"""Scale of one forecasting cycle: N instances x 6 signals x 720 points (synthetic), time and memory.

A *cold* cycle is what a freshly started forecaster does with a query_range answer: ingest the
whole 720-point history of every instance (state updates only), then predict every failure type
for every instance, then spend the refit budget. A *warm* cycle is the steady state: one new point
per instance, predict, refit within the budget. Both are reported for 10/100/1000 instances, with
the peak resident memory of a fresh process per size (so sizes do not inherit each other's peak).

    python benchmarks/forecast_scale.py [--sizes 10 100 1000] [--points 720] [--refit-budget 2.0]
                                        [--detector-config JSON]...

Each ``--detector-config`` adds a run of every size with those DetectorConfig settings (for a
side-by-side cost of an option, e.g. ``'{"use_capacity": false}'``); none: the defaults.

Targets (issue): one cycle over 1000 x 6 x 720 <= 15 s on 2 cores, <= 1 GiB, linear in instances.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _one(n: int, points: int, refit_budget: float, extra: dict | None = None) -> dict[str, float]:
    import numpy as np

    from vllm_otel.forecast.detector import DetectorConfig, PredictiveFailureDetector
    from vllm_otel.forecast.synthetic import SCENARIOS, frame_from_scenarios, scenario

    kinds = [SCENARIOS[i % len(SCENARIOS)] for i in range(n)]
    t0 = time.perf_counter()
    frame = frame_from_scenarios({f"inst-{i:05d}": scenario(k, points + 1, seed=i) for i, k in enumerate(kinds)})
    gen_s = time.perf_counter() - t0

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
    assert res is not None and res.probability.shape[0] == n
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"instances": n, "series": n * 6, "points": points, "generate_s": gen_s,
            "cold_ingest_s": ingest_s, "cold_predict_s": predict_s, "cold_refit_s": refit_s,
            "cold_refits": refits, "cold_cycle_s": cold_s, "warm_cycle_s": warm_predict_s + refit_s,
            "warm_predict_s": warm_predict_s, "predictions": int(np.isfinite(res.probability).sum()),
            "peak_rss_mib": rss_mib}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--points", type=int, default=720)
    ap.add_argument("--refit-budget", type=float, default=2.0, help="seconds of statsmodels fits per cycle")
    ap.add_argument("--detector-config", action="append", metavar="JSON",
                    help="DetectorConfig settings for one run of every size (repeatable; default: none)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size, JSON out
    args = ap.parse_args()
    if args.one:
        extra = json.loads(args.detector_config[0]) if args.detector_config else None
        print(json.dumps(_one(args.one, args.points, args.refit_budget, extra)))
        return 0
    configs = args.detector_config or [None]
    print(f"{'config':>24} {'instances':>9} {'series':>7} {'ingest s':>9} {'predict s':>9} {'refit s':>8} "
          f"{'refits':>6} {'cold s':>7} {'warm s':>7} {'warm pred ms':>12} {'peak MiB':>9}")
    for n in args.sizes:
        for conf in configs:  # sizes outer, configs inner: a comparison runs side by side
            cmd = [sys.executable, __file__, "--one", str(n), "--points", str(args.points),
                   "--refit-budget", str(args.refit_budget)] + (["--detector-config", conf] if conf else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{(conf or 'defaults')[:24]:>24} {r['instances']:>9} {r['series']:>7} {r['cold_ingest_s']:>9.2f} "
                  f"{r['cold_predict_s']:>9.3f} {r['cold_refit_s']:>8.2f} {r['cold_refits']:>6} "
                  f"{r['cold_cycle_s']:>7.2f} {r['warm_cycle_s']:>7.2f} {1000 * r['warm_predict_s']:>12.1f} "
                  f"{r['peak_rss_mib']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
