"""Mitigation receiver under load: time from POST to 202 and alerts/s sustained on loopback, with
a receiver restart in the middle and nothing lost.

A real ``vllm-otel receiver`` process (uvicorn, SQLite store, token auth, the example policy with
every action in dry-run so nothing acts) receives an open-loop stream of Alertmanager v4 payloads
(one new alert each) at ``--rate`` per second. Halfway through, the receiver's process group gets
SIGTERM and a new receiver starts on the same port and database; senders retry like Alertmanager
does (5xx and transport errors are retried). At the end every sent alert must be in the store.

    .venv/bin/python benchmarks/receiver_load.py --rate 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_otel.testing.processes import ManagedProcess, free_port, wait_http  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def payload(i: int) -> dict:
    labels = {"alertname": "VllmRequestsQueueing", "instance": "127.0.0.1:8000", "model_name": "m",
              "severity": "warning", "seq": str(i)}
    fp = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    return {"version": "4", "groupKey": f"{{}}:{{seq=\"{i}\"}}", "truncatedAlerts": 0, "status": "firing",
            "receiver": "vllm-otel", "groupLabels": {"alertname": labels["alertname"]},
            "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "bench"},
                        "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://prom:9090", "fingerprint": fp}]}


def start_receiver(wd: Path, port: int, n: int) -> ManagedProcess:
    argv = [sys.executable, "-m", "vllm_otel", "receiver", "--config", str(wd / "policy.yaml"),
            "--port", str(port), "--token-file", str(wd / "token"), "--db-url", f"sqlite:///{wd / 'r.db'}"]
    proc = ManagedProcess(f"receiver-{n}", argv, wd / f"receiver-{n}.log").start()
    wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60, alive=proc.alive)
    return proc


async def main_async(args: argparse.Namespace) -> dict:
    wd = Path(tempfile.mkdtemp(prefix="vllm-otel-recv-bench-"))
    (wd / "token").write_text(TOKEN)
    policy = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    policy["default_mode"] = "dry-run"
    for rule in policy.get("rules", []):
        rule.pop("mode", None)
    for s in (policy.get("strategies") or {}).values() if isinstance(policy.get("strategies"), dict) else []:
        if isinstance(s, dict):
            s["mode"] = "dry-run"
    (wd / "policy.yaml").write_text(yaml.safe_dump(policy))
    port = free_port()
    procs = [start_receiver(wd, port, 0)]
    try:
        return await _drive(args, wd, port, procs)
    finally:
        procs[0].stop()  # never leave a receiver behind, even on Ctrl-C or a timeout


async def _drive(args: argparse.Namespace, wd: Path, port: int, procs: list) -> dict:
    url = f"http://127.0.0.1:{port}/webhook"
    total = int(args.rate * args.seconds)
    latencies: list[float] = []
    retries = 0
    restart_at = total // 2
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=10,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        async def send(i: int) -> None:
            nonlocal retries
            body = payload(i)
            while True:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    if r.status_code == 202:
                        latencies.append(time.perf_counter() - t0)
                        return
                    if r.status_code < 500:
                        raise RuntimeError(f"alert {i}: HTTP {r.status_code} {r.text[:200]}")
                except httpx.TransportError:
                    pass
                retries += 1
                await asyncio.sleep(0.2)  # Alertmanager backs off between retries

        async def restart() -> None:
            procs[0].stop()
            procs[0] = await asyncio.to_thread(start_receiver, wd, port, 1)

        tasks = []
        t_start = time.perf_counter()
        for i in range(total):
            target = t_start + i / args.rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i)))
            if args.restart and i == restart_at:
                tasks.append(asyncio.create_task(restart()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t_start
    # Count what the store holds, from the restarted receiver's own audit API.
    from vllm_otel.store import Store

    stored = len({a.fingerprint for a in Store(f"sqlite:///{wd / 'r.db'}").alerts(limit=10 ** 9)})
    lat_sorted = sorted(latencies)
    q = statistics.quantiles(lat_sorted, n=100, method="inclusive")
    return {"sent": total, "stored": stored, "lost": total - stored, "retries": retries,
            "rate_target_per_s": args.rate, "rate_sustained_per_s": total / elapsed,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "max_ms": lat_sorted[-1] * 1000,
            "restart": bool(args.restart)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="alerts per second (default 200)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--no-restart", dest="restart", action="store_false")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"sent {out['sent']} alerts at {out['rate_sustained_per_s']:.0f}/s (target {args.rate:.0f}/s), "
              f"stored {out['stored']}, lost {out['lost']}, retries {out['retries']}, restart={out['restart']}")
        print(f"POST -> 202 latency: p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms, "
              f"max {out['max_ms']:.1f} ms (p99 includes the requests that waited out the restart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
