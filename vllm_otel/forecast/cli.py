"""``vllm-otel backtest``: replay a Prometheus query_range dump through the detector and score it.
``vllm-otel forecaster``: the long-running forecasting service (see :mod:`vllm_otel.forecast.service`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run", "add_forecaster_parser", "run_forecaster"]

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
    p.add_argument("--hold", type=float, default=0.0, metavar="S",
                   help="with --score: keep each alarm on for S seconds after it stops, as an alert "
                        "rule with keep_firing_for: S would page (default 0: the raw steps)")
    p.add_argument("--max-refits", type=int, default=8, metavar="N",
                   help="statsmodels refits per step at most (default 8)")
    p.add_argument("--json", action="store_true", help="print the score as JSON")
    p.add_argument("--shard", metavar="K/N", help="only instances in shard K of N (stable hash)")
    p.set_defaults(func=run)
    add_forecaster_parser(subparsers)
    return p


def _fail(msg: str) -> int:
    print(f"vllm-otel backtest: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from vllm_otel.forecast.backtest import calibration, replay, score, score_json, write_jsonl
    from vllm_otel.forecast.detector_config import DetectorConfig
    from vllm_otel.forecast.promjson import InputError, load_query_range, parse_shard

    if not 0.0 < args.threshold <= 1.0:
        return _fail("--threshold must be in (0, 1]")
    if args.horizon <= 0 or args.baseline_window <= 0:
        return _fail("--horizon and --baseline-window must be positive")
    if not args.hold >= 0:
        return _fail("--hold must be 0 or more seconds")
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
                     static_fraction=args.static_fraction, hold_s=args.hold)
        params = {"threshold": args.threshold, "baseline_window_s": args.baseline_window,
                  "static_fraction": args.static_fraction, "hold_s": args.hold}
        cals = calibration(result, threshold=args.threshold)
        if args.json:
            json.dump(score_json(rows, result, cals, **params), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            _print_table(rows, result, params)
            _print_calibration(cals, params)
    return 0


def _print_table(rows: list[Any], result: Any, params: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    table = Table(title=(f"backtest: {len(result.units)} instance(s), {len(result.t)} steps of "
                         f"{result.step_s:g}s, horizon {result.horizon_s:g}s, alarm at p>={params['threshold']}"
                         + (f", held {params['hold_s']:g}s" if params.get("hold_s") else "")))
    for col in ("failure_type", "method", "events", "caught", "recall", "alarms", "precision",
                "false/h", "quiet in alarm", "median lead s", "F1"):
        table.add_column(col, justify="left" if col in ("failure_type", "method") else "right", no_wrap=True)
    last = None
    for r in rows:
        table.add_row(r.failure_type if r.failure_type != last else "", r.method, str(r.events),
                      str(r.caught), pct(r.recall), str(r.alarms), pct(r.precision),
                      f"{r.false_alarms_per_hour:.2f}",
                      "-" if r.quiet_alarm_share is None else f"{100 * r.quiet_alarm_share:.1f} %",
                      "-" if r.median_lead_s is None else f"{r.median_lead_s:g}", pct(r.f1))
        last = r.failure_type
    console = Console(file=sys.stdout, width=max(150, Console().width))
    console.print(table)
    console.print(f"predict_linear: lookback {params['baseline_window_s']:g}s, same horizon and thresholds; "
                  f"static: {params['static_fraction']:g} x threshold")


def _print_calibration(cals: list[Any], params: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from vllm_otel.forecast.backtest import CALIBRATION_LEGEND, calibration_rows

    header, rows = calibration_rows(cals, params["threshold"])
    table = Table(title="can the detector be taken at its word? (steps with no failure under way; outcome: "
                        "an onset within the horizon)")
    for col in header:
        table.add_column(col, justify="left" if col == "failure_type" else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(file=sys.stdout, width=max(150, Console().width))
    console.print(table)
    console.print(CALIBRATION_LEGEND + " --json adds the reliability table (mean forecast against observed "
                  "share, per bin).")


# -- vllm-otel forecaster ----------------------------------------------------------------------

_FORECASTER_EPILOG = """\
Data: --prometheus URL asks a Prometheus (query_range: a backfill on start, then the new points
each cycle); otherwise the forecaster scrapes the vLLM /metrics endpoints given by --scrape itself
(default http://127.0.0.1:8000).

Serves on --listen: /metrics (vllm_otel_failure_probability{instance,model_name,failure_type},
vllm_otel_time_to_failure_seconds, vllm_otel_forecast{signal,quantile}, and its own health:
vllm_otel_forecaster_up, _data_age_seconds{instance}, _prediction_stale{instance},
_cycle_duration_seconds, _errors_total{stage}) and /healthz.

When the source fails, the last predictions stay published with
vllm_otel_forecaster_prediction_stale=1 and a growing data age; nothing new is invented.
An instance without data for --instance-ttl seconds is dropped.

--once --json: one cycle, the predictions as JSON on stdout (every failure type per instance;
probability null where there is too little data), exit 0 (1 when the source failed).
--otlp: also push the same gauges over OTLP (OTEL_EXPORTER_OTLP_* and OTEL_METRIC_EXPORT_INTERVAL).
"""


def add_forecaster_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "forecaster", help="run the failure forecaster as a service (Prometheus or direct scrape)",
        description="Forecast vLLM failures continuously and publish probabilities and times to "
                    "failure on /metrics.", epilog=_FORECASTER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prometheus", metavar="URL", help="Prometheus base URL (production mode)")
    src.add_argument("--scrape", metavar="URL[,URL...]",
                     help="vLLM servers to scrape directly (host:port or URL; default http://127.0.0.1:8000)")
    p.add_argument("--selector", default="", metavar="MATCHERS",
                   help="extra PromQL label matchers for --prometheus, e.g. 'job=\"vllm\"'")
    p.add_argument("--interval", type=float, metavar="S",
                   help="seconds between cycles, also the detector's step (default: the config's step_s, 5)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="per-request timeout for Prometheus or each scrape (default 5)")
    p.add_argument("--backfill", type=float, metavar="S",
                   help="history read from Prometheus on start (default: fit_window x step)")
    p.add_argument("--instance-ttl", type=float, metavar="S",
                   help="drop an instance without data this long (default: the config's forget_after_s, 600)")
    p.add_argument("--listen", default="127.0.0.1:9464", metavar="HOST:PORT",
                   help="where /metrics and /healthz are served (default 127.0.0.1:9464)")
    p.add_argument("--shard", metavar="K/N", help="only instances in shard K of N (stable hash of instance)")
    p.add_argument("--config", metavar="FILE", help="DetectorConfig as JSON or YAML")
    p.add_argument("--once", action="store_true", help="run one cycle, print the predictions, exit")
    p.add_argument("--json", action="store_true", help="with --once: print JSON")
    p.add_argument("--otlp", action="store_true", help="also push the gauges over OTLP (OTEL_* env)")
    p.set_defaults(func=run_forecaster)
    return p


def _ffail(msg: str) -> int:
    print(f"vllm-otel forecaster: error: {msg}", file=sys.stderr)
    return 2


def _load_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)  # JSON is YAML
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid JSON/YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of DetectorConfig fields")
    return data


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def run_forecaster(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pydantic import ValidationError

    from vllm_otel.forecast.detector_config import DetectorConfig
    from vllm_otel.forecast.promjson import InputError, parse_shard
    from vllm_otel.forecast.service import ForecasterService
    from vllm_otel.forecast.sources import PrometheusSource, ScrapeSource

    if args.json and not args.once:
        return _ffail("--json needs --once (the service publishes on /metrics)")
    for name in ("interval", "timeout", "backfill", "instance_ttl"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            return _ffail(f"--{name.replace('_', '-')} must be positive")
    try:
        shard = parse_shard(args.shard) if args.shard else None
        raw = _load_config(args.config) if args.config else {}
        if args.interval is not None:
            raw["step_s"] = args.interval
        config = DetectorConfig.model_validate(raw)
        host, port = _listen(args.listen)
    except (InputError, ValueError) as e:
        if isinstance(e, ValidationError):
            first = e.errors()[0]
            return _ffail(f"config: {'.'.join(map(str, first['loc']))}: {first['msg']}")
        return _ffail(str(e))
    step = config.step_s
    try:
        if args.prometheus:
            source: Any = PrometheusSource(args.prometheus, args.selector, args.timeout, step_s=step,
                                           backfill_s=args.backfill or config.fit_window * step,
                                           shard=shard, inputs=config.inputs)
        else:
            if args.selector:
                return _ffail("--selector applies to --prometheus only")
            targets = [t for t in (args.scrape or "http://127.0.0.1:8000").split(",") if t.strip()]
            source = ScrapeSource(targets, args.timeout, shard=shard, inputs=config.inputs, step_s=step)
    except ValueError as e:
        return _ffail(str(e))
    service = ForecasterService(source, config, instance_ttl_s=args.instance_ttl)

    otlp = None
    if args.otlp:
        from vllm_otel.forecast.publish import OtlpPublisher

        otlp = OtlpPublisher(lambda: service.snapshot, service.clock,
                             on_error=lambda: service.metrics.errors.labels(stage="otlp").inc())

    if args.once:
        try:
            report = service.run_cycle()
            if otlp is not None:
                otlp.flush()
        finally:
            if otlp is not None:
                otlp.shutdown()
            source.close()
        _print_once(service.to_json(), args.json)
        return 0 if report.ok else 1

    try:
        server = service.serve(host, port)
    except OSError as e:
        source.close()
        return _ffail(f"cannot listen on {args.listen}: {e.strerror or e}")
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    print(f"vllm-otel forecaster: {source.kind} source, every {service.interval_s:g}s, "
          f"serving {server.url}/metrics", file=sys.stderr, flush=True)
    try:
        service.run(stop)
    finally:
        service.stop()
        if otlp is not None:
            otlp.shutdown()
    return 0


def _print_once(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(f"source {doc['source']} up={doc['up']} horizon {doc['horizon_s']:g}s")
    for e in doc["errors"]:
        print(f"  error [{e['stage']}] {e['message']}")
    for u in doc["instances"]:
        print(f"{u['unit']} model={u['model_name'] or '-'} data_age={u['data_age_seconds']:.1f}s"
              + (" STALE" if u["stale"] else ""))
        for f, v in u["failures"].items():
            p = "no prediction" if v["probability"] is None else f"p={v['probability']:.3f}"
            ttf = v["time_to_failure_seconds"]
            print(f"  {f:22s} {p}" + ("" if ttf is None else f" ttf={ttf:g}s"))
