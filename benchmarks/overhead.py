"""Overhead of the vllm-otel plugins on real vLLM: the same real-trace replay against a server
without our plugins (``VLLM_PLUGINS=""``) and one with them (``VLLM_PLUGINS=vllm_otel``, OTLP
traces and metrics exported to a real local receiver), interleaved A/B/B/A in one process so
machine noise hits both sides alike. Prints throughput and TTFT p50/p99 per side and the ratios.

    .venv/bin/python benchmarks/overhead.py --rounds 3 --requests 200

It is a benchmark, not a test: it prints numbers; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import tempfile
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_otel.loadgen.replay import run_replay  # noqa: E402
from vllm_otel.loadgen.traces import load_trace  # noqa: E402
from vllm_otel.testing.otlp import OtlpReceiver  # noqa: E402
from vllm_otel.testing.rules import default_traces_dir  # noqa: E402
from vllm_otel.testing.services import VllmServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None, help="trace file (default: Azure conversation trace)")
    ap.add_argument("--requests", type=int, default=200, help="requests per run")
    ap.add_argument("--rounds", type=int, default=3, help="A/B/B/A rounds")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-input", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--model", default=str(ROOT / ".cache" / "tiny-model"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=True)
    trace = Path(args.trace) if args.trace else default_traces_dir() / "AzureLLMInferenceTrace_conv.csv"
    reqs = load_trace(trace, limit=args.requests)
    results: dict[str, list[dict]] = {"without": [], "with": []}
    ttfts: dict[str, list[float]] = {"without": [], "with": []}

    def cpu_seconds(server: VllmServer) -> tuple[float, float]:
        """CPU time of the API-server process, and of it plus all its children (engine, workers)."""
        root = psutil.Process(server.proc.pid)
        own = sum(root.cpu_times()[:2])
        total = own
        for c in root.children(recursive=True):
            try:
                total += sum(c.cpu_times()[:2])
            except psutil.Error:
                pass
        return own, total
    with tempfile.TemporaryDirectory(prefix="vllm-otel-overhead-") as wd, OtlpReceiver() as rx:
        common = dict(max_model_len=2048)
        env_with = {**rx.otel_env("grpc"), "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
        console.print("starting two vLLM servers (without / with vllm-otel) ...")
        with VllmServer(args.model, wd, plugins="", env={"VLLM_ENABLE_MONITORING": "false"},
                        name="vllm-without", **common) as a, \
                VllmServer(args.model, wd, plugins="vllm_otel", env=env_with, name="vllm-with", **common) as b:
            servers = {"without": a, "with": b}

            def only(side: str) -> None:
                """Run ``side`` alone: the other server's whole process group (our own child)
                is frozen with SIGSTOP, so its idle threads (vLLM's CPU workers poll) take no
                CPU from the measured one on these 2 cores; SIGCONT wakes it for its turn."""
                for name, srv in servers.items():
                    os.killpg(srv.proc.pid, signal.SIGCONT if name == side else signal.SIGSTOP)
                time.sleep(1.0)  # let the woken server settle

            try:
                for side in ("without", "with"):  # warm-up, not measured
                    only(side)
                    run_replay(reqs[:20], servers[side].url, speed=1e6, concurrency=args.concurrency,
                               max_input_tokens=args.max_input, max_output_tokens=args.max_output, progress=False)
                for rnd in range(args.rounds):
                    for side in ("without", "with", "with", "without"):
                        only(side)
                        api0, all0 = cpu_seconds(servers[side])
                        sink = ttfts[side]
                        s = run_replay(reqs, servers[side].url, speed=1e6, concurrency=args.concurrency,
                                       max_input_tokens=args.max_input, max_output_tokens=args.max_output,
                                       progress=False,
                                       on_result=lambda r, sink=sink: sink.append(r.ttft_s) if r.ok else None)
                        api1, all1 = cpu_seconds(servers[side])
                        if s.ok != len(reqs):
                            console.print(f"[red]{side}: {s.errors}")
                        results[side].append({"rps": s.throughput_rps, "tok_s": s.output_tokens_per_s,
                                              "api_cpu_ms_per_req": (api1 - api0) / max(s.ok, 1) * 1000,
                                              "cpu_ms_per_req": (all1 - all0) / max(s.ok, 1) * 1000})
                        console.print(f"round {rnd + 1} {side:8s} {s.throughput_rps:6.2f} req/s "
                                      f"API CPU {results[side][-1]['api_cpu_ms_per_req']:5.2f} ms/req "
                                      f"TTFT p50 {s.ttft_p50_s * 1000:6.1f} ms p99 {s.ttft_p99_s * 1000:7.1f} ms")
            finally:
                for srv in servers.values():  # both awake again, so that they stop cleanly
                    os.killpg(srv.proc.pid, signal.SIGCONT)
            time.sleep(6)  # one more OTLP export interval: spans of the last run arrive
            spans = len(rx.spans())
    med = {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for side, rows in results.items()}
    for side, vals in ttfts.items():  # percentiles over every request of every run, pooled
        q = statistics.quantiles(vals, n=100, method="inclusive")
        med[side]["ttft_p50"], med[side]["ttft_p99"] = q[49], q[98]
    ratio = {k: med["with"][k] / med["without"][k] for k in med["with"]}
    out = {"median": med, "ratio_with_over_without": ratio, "runs_per_side": len(results["with"]),
           "requests_per_run": len(reqs), "spans_received": spans}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    t = Table(title=f"vllm-otel overhead: {len(reqs)} requests x {len(results['with'])} runs per side, "
                    f"concurrency {args.concurrency} (throughput, CPU: median of runs; TTFT: pooled)")
    for col in ("metric", "without plugins", "with vllm-otel", "ratio"):
        t.add_column(col, justify="right")
    for k, label, fmt in (("rps", "throughput (req/s)", "{:.2f}"), ("tok_s", "output tokens/s", "{:.0f}"),
                          ("ttft_p50", "TTFT p50 (ms)", "{:.1f}"), ("ttft_p99", "TTFT p99 (ms)", "{:.1f}"),
                          ("api_cpu_ms_per_req", "API-server CPU per request (ms)", "{:.2f}"),
                          ("cpu_ms_per_req", "all vLLM processes CPU per request (ms)", "{:.2f}")):
        scale = 1000 if k.startswith("ttft_") else 1
        t.add_row(label, fmt.format(med["without"][k] * scale), fmt.format(med["with"][k] * scale),
                  f"{ratio[k]:.3f}")
    Console().print(t)
    print(f"spans received by the OTLP receiver: {spans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
