"""What the vllm-otel plugins cost per request, per process: the same loads against vLLM servers
without our plugins (``VLLM_PLUGINS=""``), with metrics only over OTLP (``OTEL_TRACES_EXPORTER=none``),
with traces and metrics over OTLP, and optionally with traces sampled at a ratio. All servers
run side by side; only the one measured is awake (the others' process groups are stopped with
SIGSTOP), and every round visits the sides in a rotated order, so machine noise hits all alike.

Two loads per visit:
- **API-bound**: short prompts (4-16 tokens), ``max_tokens`` 1-4, many requests in flight over
  lean keep-alive connections (benchmarks/rawload.py): the API server's one Python thread is the
  bottleneck, as at high request rates on a GPU;
- **tokens**: streamed requests of the Azure conversation trace (128-512 prompt tokens, 64
  output tokens, 16 in flight): CPU per output token across all vLLM processes.

CPU is read from ``/proc/<pid>/stat`` (user + system) for the API-server process and for its
descendants (engine core and its workers) before and after each load. Medians over the rounds.

    flock /tmp/vllm-otel-heavy.lock .venv/bin/python benchmarks/plugin_cost.py --rounds 4

It is a benchmark, not a test: it prints numbers; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rawload import make_bodies, run_load  # noqa: E402

from vllm_otel.loadgen.replay import run_replay  # noqa: E402
from vllm_otel.loadgen.traces import load_trace  # noqa: E402
from vllm_otel.testing.otlp_receiver import OtlpReceiver  # noqa: E402
from vllm_otel.testing.rules import default_traces_dir  # noqa: E402
from vllm_otel.testing.services import VllmServer  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
SIDES = {
    "off": ("without plugins", None),
    "metrics": ("metrics only", {"OTEL_TRACES_EXPORTER": "none"}),
    "sampled": ("traces 10 % + metrics", {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                          "OTEL_TRACES_SAMPLER_ARG": "0.1"}),
    "all": ("traces + metrics", {}),
}


def label(side: str) -> str:
    kind, _, code = side.partition("@")
    return SIDES[kind][0] + (f" ({code})" if code else "")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu(server: VllmServer) -> tuple[float, float]:
    """(API-server CPU, CPU of its descendants: engine core and workers)."""
    root = psutil.Process(server.proc.pid)
    kids = 0.0
    for c in root.children(recursive=True):
        try:
            kids += proc_cpu(c.pid)
        except OSError:
            pass
    return proc_cpu(root.pid), kids


def main() -> int:  # noqa: C901, PLR0915
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sides", default="off,metrics,all", help=f"comma list of {','.join(SIDES)}")
    ap.add_argument("--api-seconds", type=float, default=15.0, help="API-bound load per visit")
    ap.add_argument("--api-concurrency", type=int, default=64)
    ap.add_argument("--token-requests", type=int, default=48, help="streamed requests per visit (0: skip)")
    ap.add_argument("--before", metavar="DIR", default=None,
                    help="also run the metrics and all sides with the vllm_otel found in DIR (an export of "
                         "an older commit: `git archive REV | tar -x -C DIR`), as sides metrics@before, all@before")
    ap.add_argument("--model", default=str(ROOT / ".cache" / "tiny-model"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sides = [s for s in args.sides.split(",") if s]
    if args.before:
        sides += [f"{s}@before" for s in ("metrics", "all") if s in sides]
    console = Console(stderr=True)
    bodies = make_bodies("tiny")
    reqs = load_trace(default_traces_dir() / "AzureLLMInferenceTrace_conv.csv", limit=args.token_requests) \
        if args.token_requests else []
    rows: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="vllm-otel-cost-") as wd, OtlpReceiver() as rx:
        servers: dict[str, VllmServer] = {}
        try:
            for s in sides:
                kind, _, code = s.partition("@")
                env = {"VLLM_ENABLE_MONITORING": "false"} if s == "off" else \
                    {**rx.otel_env("grpc"), "OTEL_METRIC_EXPORT_INTERVAL": "10000", **SIDES[kind][1]}
                if code:
                    env["PYTHONPATH"] = str(Path(args.before).resolve())
                console.print(f"starting vLLM: {label(s)} ...")
                servers[s] = VllmServer(args.model, wd, plugins="" if s == "off" else "vllm_otel", env=env,
                                        name=f"vllm-{s.replace('@', '-')}", max_model_len=1024).start()
                os.killpg(servers[s].proc.pid, signal.SIGSTOP)

            def only(side: str) -> None:
                for name, srv in servers.items():
                    os.killpg(srv.proc.pid, signal.SIGCONT if name == side else signal.SIGSTOP)
                time.sleep(1.0)

            for s in sides:  # warm-up, not measured
                only(s)
                run_load(servers[s].url, bodies, 3, args.api_concurrency)
            for rnd in range(args.rounds):
                order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]
                for s in order:
                    only(s)
                    srv = servers[s]
                    a0, k0 = cpu(srv)
                    r = run_load(srv.url, bodies, args.api_seconds, args.api_concurrency)
                    a1, k1 = cpu(srv)
                    row = {"rps": r.rps, "api_us_per_req": (a1 - a0) / max(r.ok, 1) * 1e6,
                           "engine_us_per_req": (k1 - k0) / max(r.ok, 1) * 1e6, "errors": r.errors}
                    if reqs:
                        a0, k0 = cpu(srv)
                        t = run_replay(reqs, srv.url, speed=1e6, concurrency=16, max_input_tokens=512,
                                       max_output_tokens=64, progress=False)
                        a1, k1 = cpu(srv)
                        toks = max(t.output_tokens, 1)
                        row["cpu_us_per_token"] = ((a1 - a0) + (k1 - k0)) / toks * 1e6
                        row["tok_api_us_per_req"] = (a1 - a0) / max(t.ok, 1) * 1e6
                    rows[s].append(row)
                    console.print(f"round {rnd + 1} {s:8s} {r.rps:7.1f} req/s  API {row['api_us_per_req']:7.0f} "
                                  f"us/req  engine {row['engine_us_per_req']:7.0f} us/req"
                                  + (f"  all {row['cpu_us_per_token']:6.1f} us/token" if reqs else ""))
        finally:
            for srv in servers.values():
                try:
                    os.killpg(srv.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                srv.stop()
        spans = len(rx.spans())
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in rows.items()}
    base = med.get("off")
    out = {"median": med, "spans_received": spans, "rounds": args.rounds, "api_seconds": args.api_seconds,
           "api_concurrency": args.api_concurrency, "token_requests": args.token_requests}
    console.print(json.dumps({"rows": rows}))  # every visit, for the record
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    t = Table(title=f"vllm-otel plugin cost, median of {args.rounds} interleaved rounds "
                    f"(API-bound: {args.api_seconds:.0f} s at {args.api_concurrency} in flight, max_tokens 1-4; "
                    f"tokens: {args.token_requests} streamed requests x 64 tokens)")
    for col in ("side", "API-bound req/s", "ratio", "API-server CPU us/req", "+ vs off", "engine CPU us/req",
                "all CPU us/token", "ratio "):
        t.add_column(col, justify="right")
    for s in sides:
        m = med[s]
        t.add_row(label(s), f"{m['rps']:.1f}", f"{m['rps'] / base['rps']:.3f}" if base else "-",
                  f"{m['api_us_per_req']:.0f}", f"{m['api_us_per_req'] - base['api_us_per_req']:+.0f}" if base else "-",
                  f"{m['engine_us_per_req']:.0f}",
                  f"{m['cpu_us_per_token']:.1f}" if "cpu_us_per_token" in m else "-",
                  f"{m['cpu_us_per_token'] / base['cpu_us_per_token']:.3f}"
                  if base and "cpu_us_per_token" in m else "-")
    Console().print(t)
    print(f"spans received by the OTLP receiver: {spans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
