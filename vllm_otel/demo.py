"""``vllm-otel demo``: a short, real run of the stack on one machine.

Starts vLLM (OpenAI server) with the vllm-otel plugins on the tiny model with a capped KV cache,
a real Prometheus scraping it every second with the project's alert rules, a real Alertmanager
posting to a local webhook endpoint; replays a real request trace against vLLM; then prints what
Prometheus scraped and which alerts reached the webhook. Everything is stopped at the end unless
``--keep-running``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_demo"]

# PromQL shown after the run: what a user would look at first on a vLLM dashboard.
_QUERIES: list[tuple[str, str]] = [
    ("requests finished", 'sum(vllm:request_success_total)'),
    ("prompt tokens", 'sum(vllm:prompt_tokens_total)'),
    ("generated tokens", 'sum(vllm:generation_tokens_total)'),
    ("max running requests", 'max(max_over_time(vllm:num_requests_running[{w}]))'),
    ("max waiting requests", 'max(max_over_time(vllm:num_requests_waiting[{w}]))'),
    ("max KV-cache usage", 'max(max_over_time(vllm:kv_cache_usage_perc[{w}]))'),
    ("preemptions", 'sum(vllm:num_preemptions_total)'),
    ("TTFT p50 (s)", 'histogram_quantile(0.5, sum by (le) (increase(vllm:time_to_first_token_seconds_bucket[{w}])))'),
    ("TTFT p99 (s)", 'histogram_quantile(0.99, sum by (le) (increase(vllm:time_to_first_token_seconds_bucket[{w}])))'),
    ("vllm-otel plugin loaded", 'max(vllm_otel_build_info)'),
    ("engine steps seen by vllm-otel", 'sum(vllm_otel_stat_records_total)'),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="short real run: vLLM + plugin, trace replay, Prometheus, Alertmanager",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the tiny model, made if missing)")
    p.add_argument("--trace", help="trace file (default: Azure conversation trace from shared/data/traces)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of trace to replay (default %(default)s)")
    p.add_argument("--speed", type=float, default=8.0, help="trace speed-up (default %(default)s)")
    p.add_argument("--kv-blocks", type=int, default=24,
                   help="cap vLLM's KV cache at this many blocks (128 tokens each on CPU) so the load saturates it (default %(default)s)")
    p.add_argument("--workdir", help="where configs and logs go (default: a temporary directory)")
    p.add_argument("--keep-running", action="store_true", help="leave the services up until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _scalar(result: list[dict[str, Any]]) -> float | None:
    if not result:
        return None
    try:
        return float(result[0]["value"][1])
    except (KeyError, IndexError, ValueError):
        return None


def run_demo(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from vllm_otel.loadgen.replay import run_replay
    from vllm_otel.loadgen.traces import load_trace
    from vllm_otel.testing.rules import default_alert_rules, default_traces_dir, rules_with_short_for
    from vllm_otel.testing.services import AlertmanagerServer, PrometheusServer, VllmServer
    from vllm_otel.testing.tiny_model import write_tiny_model
    from vllm_otel.testing.webhook import WebhookSink

    out: dict[str, Any] = {"steps": []}

    def step(msg: str) -> None:
        out["steps"].append(msg)
        if not args.json:
            console.print(f"[bold cyan]•[/] {msg}")

    with ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="vllm-otel-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        model = Path(args.model) if args.model else Path(".cache/tiny-model")
        if not (model / "config.json").is_file():
            step(f"writing tiny model to {model}")
            write_tiny_model(model)
        trace = Path(args.trace) if args.trace else (default_traces_dir() or Path(".")) / "AzureLLMInferenceTrace_conv.csv"
        if not trace.is_file():
            raise SystemExit(f"trace file {trace} not found: pass --trace FILE")

        sink = stack.enter_context(WebhookSink())
        step(f"webhook endpoint listening at {sink.url}")
        am = stack.enter_context(AlertmanagerServer(workdir, webhook_url=sink.url))
        step(f"Alertmanager {am.url} (clustering off) -> webhook")
        rules = [rules_with_short_for(r, workdir / r.name, hold="5s") for r in default_alert_rules()]
        step(f"starting vLLM on {model} with the vllm-otel plugins, KV cache capped at "
             f"{args.kv_blocks} blocks (under a minute on CPU)")
        t0 = time.monotonic()
        vllm = stack.enter_context(VllmServer(model, workdir, num_gpu_blocks=args.kv_blocks,
                                              max_model_len=2048))
        step(f"vLLM ready at {vllm.url} in {time.monotonic() - t0:.0f} s")
        prom = stack.enter_context(PrometheusServer(workdir, targets={"vllm": [vllm.url]},
                                                    rule_files=rules, alertmanager=am.url))
        step(f"Prometheus {prom.url} scraping every 1 s, {len(rules)} rule file(s), "
             "alert hold times shortened to 5 s for the demo")

        requests = load_trace(trace)
        step(f"replaying {trace.name} for {args.duration:.0f} s of wall time at {args.speed}x")
        requests = [r for r in requests if r.offset_s / args.speed < args.duration]
        summary = run_replay(requests, vllm.url, speed=args.speed, max_input_tokens=1024,
                             max_output_tokens=128, progress=not args.json)
        out["replay"] = summary.to_dict()
        time.sleep(3)  # two more scrapes so the last requests are in Prometheus

        window = f"{int(args.duration) + 30}s"
        out["prometheus"] = {}
        for label, q in _QUERIES:
            out["prometheus"][label] = _scalar(prom.query(q.format(w=window)))
        alerts = [a for item in sink.received for a in item["payload"].get("alerts", [])]
        out["alerts_received"] = sorted({(a["labels"].get("alertname"), a["status"]) for a in alerts})
        out["workdir"] = str(workdir)

        if args.keep_running:
            console.print(f"services running: vLLM {vllm.url}  Prometheus {prom.url}  "
                          f"Alertmanager {am.url}; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return out


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm-otel demo needs vLLM: pip install 'vllm-otel[cpu]' (CPU) or 'vllm-otel[gpu]'",
              file=sys.stderr)
        return 2
    result = run_demo(args, console)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    r = result["replay"]
    console.print(f"\n[bold]Replay[/]: {r['requests']} requests, {r['ok']} ok, errors {r['errors']}, "
                  f"{r['throughput_rps']:.2f} req/s")
    t = Table(title="What Prometheus scraped from vLLM")
    t.add_column("signal")
    t.add_column("value", justify="right")
    for k, v in result["prometheus"].items():
        t.add_row(k, "-" if v is None else (f"{v:,.0f}" if float(v).is_integer() else f"{v:.3g}"))
    console.print(t)
    if result["alerts_received"]:
        for name, status in result["alerts_received"]:
            console.print(f"[bold yellow]alert via Alertmanager webhook[/]: {name} ({status})")
    else:
        console.print("no alert fired during this run")
    return 0
