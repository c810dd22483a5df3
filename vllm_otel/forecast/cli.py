"""``vllm-otel backtest``: replay a Prometheus query_range dump through the detector and score it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]

_EPILOG = """\
INPUT.json is what Prometheus answers to
  /api/v1/query_range?query={__name__=~"vllm:.+"}&start=...&end=...&step=5
(resultType matrix), raw vLLM series of one or more instances.

Output: JSON Lines {"t","instance","failure_type","probability","time_to_failure_seconds"},
one per step, instance and failure type with enough data for a prediction.
With --score and no --output, only the score is printed.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "backtest", help="replay recorded vLLM metrics through the failure detector and score it",
        description="Replay a Prometheus query_range response step by step through the failure "
                    "detector; optionally score it against predict_linear and a static threshold.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT.json", help="query_range response (matrix); - for stdin")
    p.add_argument("--output", "-o", metavar="FILE.jsonl", help="predictions (default: stdout)")
    p.add_argument("--score", action="store_true", help="label failures and print recall, precision, "
                   "false alarms per hour and median lead for the detector and both baselines")
    p.add_argument("--threshold", type=float, default=0.7, help="alarm probability (default 0.7)")
    p.add_argument("--step", type=float, metavar="S", help="resample to S seconds (default: the input's step)")
    p.add_argument("--horizon", type=float, default=120.0, metavar="S",
                   help="how far ahead to predict, seconds (default 120)")
    p.add_argument("--baseline-window", type=float, default=300.0, metavar="S",
                   help="predict_linear lookback window, seconds (default 300)")
    p.add_argument("--static-fraction", type=float, default=0.8,
                   help="static early warning at this fraction of each failure threshold (default 0.8)")
    p.add_argument("--max-refits", type=int, default=8, metavar="N",
                   help="statsmodels refits per step at most (default 8)")
    p.add_argument("--json", action="store_true", help="print the score as JSON")
    p.add_argument("--shard", metavar="K/N", help="only instances in shard K of N (stable hash)")
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"vllm-otel backtest: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from vllm_otel.forecast.backtest import replay, score, score_json, write_jsonl
    from vllm_otel.forecast.detector import DetectorConfig
    from vllm_otel.forecast.promjson import InputError, load_query_range, parse_shard

    if not 0.0 < args.threshold <= 1.0:
        return _fail("--threshold must be in (0, 1]")
    if args.horizon <= 0 or args.baseline_window <= 0:
        return _fail("--horizon and --baseline-window must be positive")
    try:
        shard = parse_shard(args.shard) if args.shard else None
        frame = load_query_range(args.input, step=args.step, shard=shard)
    except InputError as e:
        return _fail(str(e))
    if not frame.units:
        return _fail(f"{args.input}: no vLLM series the detector reads (e.g. vllm:kv_cache_usage_perc)"
                     + (" in this shard" if shard else ""))
    if len(frame.t) < 2:
        return _fail(f"{args.input}: only one time step; a backtest needs a range")
    try:
        config = DetectorConfig(step_s=frame.step_s, horizon_s=args.horizon,
                                max_refits_per_step=max(args.max_refits, 0))
    except ValueError as e:
        return _fail(str(e).splitlines()[0])
    result = replay(frame, config)

    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                write_jsonl(result, fh)
        except OSError as e:
            return _fail(f"cannot write {args.output}: {e}")
    elif not args.score:
        try:
            write_jsonl(result, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            import os
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    if args.score:
        rows = score(result, threshold=args.threshold, baseline_window_s=args.baseline_window,
                     static_fraction=args.static_fraction)
        params = {"threshold": args.threshold, "baseline_window_s": args.baseline_window,
                  "static_fraction": args.static_fraction}
        if args.json:
            json.dump(score_json(rows, result, **params), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            _print_table(rows, result, params)
    return 0


def _print_table(rows: list[Any], result: Any, params: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    table = Table(title=(f"backtest: {len(result.units)} instance(s), {len(result.t)} steps of "
                         f"{result.step_s:g}s, horizon {result.horizon_s:g}s, alarm at p>={params['threshold']}"))
    for col in ("failure_type", "method", "events", "caught", "recall", "alarms", "precision",
                "false/h", "median lead s", "F1"):
        table.add_column(col, justify="left" if col in ("failure_type", "method") else "right", no_wrap=True)
    last = None
    for r in rows:
        table.add_row(r.failure_type if r.failure_type != last else "", r.method, str(r.events),
                      str(r.caught), pct(r.recall), str(r.alarms), pct(r.precision),
                      f"{r.false_alarms_per_hour:.2f}",
                      "-" if r.median_lead_s is None else f"{r.median_lead_s:g}", pct(r.f1))
        last = r.failure_type
    console = Console(file=sys.stdout, width=max(132, Console().width))
    console.print(table)
    console.print(f"predict_linear: lookback {params['baseline_window_s']:g}s, same horizon and thresholds; "
                  f"static: {params['static_fraction']:g} x threshold")
