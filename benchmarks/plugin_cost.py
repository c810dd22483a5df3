"""What the vllm-otel plugins cost per request, per process: the same loads against vLLM servers
without our plugins (``VLLM_PLUGINS=""``), with metrics only over OTLP (``OTEL_TRACES_EXPORTER=none``),
with traces and metrics over OTLP, and optionally with traces sampled at a ratio. All servers
run side by side; only the one measured is awake (the others' process groups are stopped with
SIGSTOP), and every round visits the sides in a rotated order, so machine noise hits all alike.
OTLP goes over gRPC to a local endpoint that accepts and discards (a real collector runs on another
machine: one decoding every span here would take CPU from the server under test).

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


class DiscardCollector:
    """An OTLP/gRPC endpoint that accepts every export and parses nothing.

    The collector runs elsewhere in production; on this 2-core machine a receiver that decodes
    every span (vllm_otel.testing's) would take CPU from the vLLM under test and charge it to
    the plugins. This one counts calls and bytes only."""

    SERVICES = ("opentelemetry.proto.collector.trace.v1.TraceService",
                "opentelemetry.proto.collector.metrics.v1.MetricsService",
                "opentelemetry.proto.collector.logs.v1.LogsService")

    def __init__(self) -> None:
        import grpc
        from concurrent.futures import ThreadPoolExecutor

        self.calls: dict[str, int] = {}
        self.bytes = 0

        def export(service: str):  # noqa: ANN202
            def handle(request: bytes, context: object) -> bytes:
                self.calls[service] = self.calls.get(service, 0) + 1
                self.bytes += len(request)
                return b""  # an empty Export*ServiceResponse: full success

            return grpc.unary_unary_rpc_method_handler(handle)  # bytes in, bytes out

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        for svc in self.SERVICES:
            self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(svc, {"Export": export(svc)})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> "DiscardCollector":
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)

    def otel_env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_INSECURE": "true"}


def probe(server: VllmServer) -> dict[str, float] | None:
    """CPU seconds by our function (event loop) and by thread, from the cost probe's file."""
    path = server.env.get("VLLM_OTEL_COST_PROBE")
    if not path or not os.path.exists(path):
        return None
    doc = json.loads(Path(path).read_text())
    out = {f"probe: {k}": v[1] for k, v in doc["counters"].items()}
    out.update({f"thread: {k}": v for k, v in doc["threads"].items()})
    return out


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
    ap.add_argument("--token-requests", type=int, default=0,
                    help="also a token load: this many streamed trace requests per visit (0: none)")
    ap.add_argument("--before", metavar="DIR", default=None,
                    help="also run the metrics and all sides with the vllm_otel found in DIR (an export of "
                         "an older commit: `git archive REV | tar -x -C DIR`), as sides metrics@before, all@before")
    ap.add_argument("--probe", action="store_true",
                    help="also account our code's CPU inside each plugin server (benchmarks/cost_probe): "
                         "per request, by function on the event loop and by thread")
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
    with tempfile.TemporaryDirectory(prefix="vllm-otel-cost-") as wd, DiscardCollector() as rx:
        servers: dict[str, VllmServer] = {}
        try:
            for s in sides:
                kind, _, code = s.partition("@")
                env = {"VLLM_ENABLE_MONITORING": "false"} if s == "off" else \
                    {**rx.otel_env(), "OTEL_METRIC_EXPORT_INTERVAL": "10000", **SIDES[kind][1]}
                if code:
                    env["PYTHONPATH"] = str(Path(args.before).resolve())
                if args.probe and s != "off":
                    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks" / "cost_probe"),
                                                         env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))])
                    env["VLLM_OTEL_COST_PROBE"] = str(Path(wd) / f"probe-{s.replace('@', '-')}.json")
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
                    p0 = probe(srv)
                    a0, k0 = cpu(srv)
                    r = run_load(srv.url, bodies, args.api_seconds, args.api_concurrency)
                    a1, k1 = cpu(srv)
                    row = {"rps": r.rps, "api_us_per_req": (a1 - a0) / max(r.ok, 1) * 1e6,
                           "engine_us_per_req": (k1 - k0) / max(r.ok, 1) * 1e6, "errors": r.errors}
                    if p0 is not None:
                        time.sleep(1.2)  # the probe writes every second
                        p1 = probe(srv)
                        for k, v in p1.items():
                            row[k] = (v - p0.get(k, 0.0)) / max(r.ok, 1) * 1e6
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
        received = {k.split('.')[3]: v for k, v in rx.calls.items()}
    med = {s: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in set().union(*rs)} for s, rs in rows.items()}
    base = med.get("off")
    if base:  # paired: each side against the server without plugins in the same round
        for s, rs in rows.items():
            med[s]["api_us_delta"] = statistics.median(r["api_us_per_req"] - o["api_us_per_req"]
                                                       for r, o in zip(rs, rows["off"]))
            med[s]["rps_ratio"] = statistics.median(r["rps"] / o["rps"] for r, o in zip(rs, rows["off"]))
            if "cpu_us_per_token" in rs[0]:
                med[s]["token_ratio"] = statistics.median(r["cpu_us_per_token"] / o["cpu_us_per_token"]
                                                          for r, o in zip(rs, rows["off"]))
    out = {"median": med, "exports_received": received, "bytes_received": rx.bytes, "rounds": args.rounds, "api_seconds": args.api_seconds,
           "api_concurrency": args.api_concurrency, "token_requests": args.token_requests}
    console.print(json.dumps({"rows": rows}))  # every visit, for the record
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    t = Table(title=f"vllm-otel plugin cost, median of {args.rounds} interleaved rounds "
                    f"(API-bound: {args.api_seconds:.0f} s at {args.api_concurrency} in flight, max_tokens 1-4"
                    + (f"; tokens: {args.token_requests} streamed requests x 64 tokens)" if reqs else ")"))
    for col in ("side", "API-bound req/s", "ratio", "API-server CPU us/req", "+ vs off", "engine CPU us/req",
                "all CPU us/token", "ratio "):
        t.add_column(col, justify="right")
    for s in sides:  # ratios and "+ vs off": medians of the per-round pairs with the side without plugins
        m = med[s]
        t.add_row(label(s), f"{m['rps']:.1f}", f"{m['rps_ratio']:.3f}" if base else "-",
                  f"{m['api_us_per_req']:.0f}", f"{m['api_us_delta']:+.0f}" if base else "-",
                  f"{m['engine_us_per_req']:.0f}",
                  f"{m['cpu_us_per_token']:.1f}" if "cpu_us_per_token" in m else "-",
                  f"{m['token_ratio']:.3f}" if base and "token_ratio" in m else "-")
    Console().print(t)
    probed = sorted({k for s in sides for k in med[s] if k.startswith(("probe: ", "thread: "))})
    if probed:
        t2 = Table(title="inside each plugin server (cost probe): CPU us per request of the API-bound load, median")
        t2.add_column("where")
        for s in sides:
            if s != "off":
                t2.add_column(label(s), justify="right")
        for k in probed:
            t2.add_row(k, *(f"{med[s].get(k, 0.0):.1f}" for s in sides if s != "off"))
        Console().print(t2)
    print(f"OTLP exports received (calls per signal): {received}, {rx.bytes / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
