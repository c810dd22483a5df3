"""The first webhooks a restarted receiver answers: what a retry wave meets.

A real ``vllm-otel receiver`` (SQLite, token auth, the example policy in dry-run, as in
``receiver_load.py``) is first fed ``--pending`` alerts with ``--no-worker``, so its database holds
that much pending work, as after a storm. Then, ``--runs`` times, a new receiver starts on that
database (its worker on, unless ``--no-worker``) and, as soon as its port accepts a connection,
gets ``--count`` webhooks one after the other, each on a new connection (retries come on new
connections). Each run's latencies are printed in order, in ms, with a summary; ``--json`` prints
the same as JSON.

    .venv/bin/python benchmarks/receiver_cold_start.py --runs 3
    .venv/bin/python benchmarks/receiver_cold_start.py --runs 3 --no-worker     # the intake alone
    .venv/bin/python benchmarks/receiver_cold_start.py --runs 3 --start-hold 0  # worker resumes at once
    .venv/bin/python benchmarks/receiver_cold_start.py --runs 3 --burst 50      # 50 at once first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from receiver_load import (
    TOKEN,
    payload,
    request_bytes,
    start_receiver,
    write_policy,
)

from vllm_otel.testing.processes import free_port


def post(port: int, i: int, starts_at: str) -> float:
    """One webhook on a new connection; ms from sending to reading the 202."""
    body = request_bytes(port, json.dumps(payload(i, starts_at)).encode())
    with socket.create_connection(("127.0.0.1", port)) as s:
        t = time.perf_counter()
        s.sendall(body)
        head = s.recv(65536)
        ms = (time.perf_counter() - t) * 1000
    if b" 202 " not in head[:20]:
        raise SystemExit(f"webhook {i}: expected 202, got {head[:200]!r}")
    return ms


async def _post_async(port: int, body: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t = time.perf_counter()
    writer.write(body)
    await writer.drain()
    head = await reader.read(65536)
    ms = (time.perf_counter() - t) * 1000
    writer.close()
    if b" 202 " not in head[:20]:
        raise SystemExit(f"expected 202, got {head[:200]!r}")
    return ms


def burst(port: int, first: int, n: int, starts_at: str) -> list[float]:
    """``n`` webhooks at once, each on its own new connection (a retry wave's first moment)."""
    bodies = [request_bytes(port, json.dumps(payload(first + i, starts_at)).encode()) for i in range(n)]

    async def go() -> list[float]:
        return list(await asyncio.gather(*(_post_async(port, b) for b in bodies)))
    return asyncio.run(go())


def wait_port(port: int, timeout_s: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return time.monotonic() - t0
        except OSError:
            time.sleep(0.002)
    raise SystemExit(f"receiver did not listen within {timeout_s} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=40, help="webhooks per run (default %(default)s)")
    ap.add_argument("--burst", type=int, default=0, metavar="N",
                    help="first send N webhooks at once (new connections), then the --count one by one")
    ap.add_argument("--pending", type=int, default=2000, help="alerts pending before the runs")
    ap.add_argument("--no-worker", action="store_true", help="the restarted receivers run no worker")
    ap.add_argument("--start-hold", type=float, default=None, metavar="S",
                    help="the policy's worker.start_hold_s (0: the worker resumes at once, as before it)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    wd = Path(tempfile.mkdtemp(prefix="vllm-otel-cold-start-"))
    (wd / "token").write_text(TOKEN)
    write_policy(wd)
    if args.start_hold is not None:
        policy = yaml.safe_load((wd / "policy.yaml").read_text())
        policy.setdefault("worker", {})["start_hold_s"] = args.start_hold
        (wd / "policy.yaml").write_text(yaml.safe_dump(policy))
    port = free_port()
    starts_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    feeder = start_receiver(wd, port, 0, ["--no-worker"])
    try:
        for i in range(args.pending):
            post(port, i, starts_at)
    finally:
        feeder.stop()
    runs = []
    for r in range(args.runs):
        # Not waiting for /healthz: the first request must be a webhook.
        proc = start_receiver(wd, port, r + 1, ["--no-worker"] if args.no_worker else [], wait=False)
        try:
            t0 = time.monotonic()
            listening = wait_port(port)
            first = args.pending + r * (args.count + args.burst)
            lat = burst(port, first, args.burst, starts_at) if args.burst else []
            lat += [post(port, first + args.burst + i, starts_at) for i in range(args.count)]
            runs.append({"listening_after_s": round(listening, 3), "ms": [round(x, 2) for x in lat],
                         "wall_s": round(time.monotonic() - t0, 3)})
        finally:
            proc.stop()
    if args.json:
        print(json.dumps({"pending": args.pending, "worker": not args.no_worker, "runs": runs}))
        return 0
    for r in runs:
        xs = r["ms"]
        print(f"listening after {r['listening_after_s']:.2f} s; median {statistics.median(xs):.1f} ms, "
              f"max {max(xs):.1f} ms, over 2 ms: {sum(x > 2 for x in xs)} of {len(xs)}")
        print("  " + " ".join(f"{x:.1f}" for x in xs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
