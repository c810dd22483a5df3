"""Mitigation receiver under load: time from POST to 202 and alerts/s sustained on loopback, with
a receiver restart in the middle and nothing lost.

A real ``vllm-otel receiver`` process (uvicorn, SQLite store, token auth, the example policy with
every action in dry-run so nothing acts, its background worker running) receives an open-loop
stream of Alertmanager v4 notifications (one new alert each) at ``--rate`` per second. Halfway
through, the receiver's process group gets SIGTERM and a new receiver starts on the same port and
database; senders retry like Alertmanager does (transport errors and 5xx are retried after a short
back-off, the same alert again: the receiver dedupes on fingerprint + startsAt). At the end every
alert must be in the store (read straight from the SQLite file).

The client is a small raw HTTP/1.1 keep-alive client on asyncio (uvloop when installed), not
httpx: at hundreds of requests per second httpx's own pool costs more CPU than the receiver and
the benchmark measured the client. Requests are sent on schedule whether or not earlier ones were
answered (open loop: a slow receiver cannot slow the offered load down), each on an idle pooled
connection or a new one.

What it prints, per rate:

* ``POST->202 p50/p99/max``: one HTTP attempt, from writing the request to reading a 202; over
  every accepted alert of the run (restart included);
* ``steady p99``: the same, leaving out alerts scheduled from 1 s before the restart to 2 s after
  the new receiver answered (cold start and the retry wave);
* ``delivery p99``: from the alert's scheduled send time to its 202, retries and client queueing
  included (what Alertmanager would see);
* ``sustained/s``: accepted alerts / (last 202 - first send); ``lost``: alerts sent but not in
  the store (must be 0); ``retried``: alerts that needed more than one attempt (the restart);
* ``client lag p99``: how late the client sent against its schedule (large: the client, not the
  receiver, was the bottleneck on this host).

    .venv/bin/python benchmarks/receiver_load.py                      # 200/s and 800/s, 20 s each
    .venv/bin/python benchmarks/receiver_load.py --rates 200 --seconds 30 --repeat 2
    .venv/bin/python benchmarks/receiver_load.py --rates 200,400,800,1600 --no-restart --json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_otel.testing.processes import ManagedProcess, free_port, wait_http  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
RETRY_BACKOFF_S = 0.2   # Alertmanager backs off between retries
GIVE_UP_S = 60.0        # an alert not accepted this long after the run counts as lost


def fingerprint(i: int) -> str:
    return hashlib.sha256(f"bench-alert-{i}".encode()).hexdigest()[:16]


def payload(i: int, starts_at: str) -> dict:
    labels = {"alertname": "VllmRequestsQueueing", "instance": "127.0.0.1:8000", "model_name": "m",
              "severity": "warning", "seq": str(i)}
    return {"version": "4", "groupKey": f"{{}}:{{seq=\"{i}\"}}", "truncatedAlerts": 0, "status": "firing",
            "receiver": "vllm-otel", "groupLabels": {"alertname": labels["alertname"]},
            "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "bench"},
                        "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://prom:9090", "fingerprint": fingerprint(i)}]}


def request_bytes(port: int, body: bytes) -> bytes:
    head = (f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: Alertmanager/bench\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Pool:
    """Keep-alive HTTP/1.1 connections to one port; a request takes an idle one or opens one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def post(self, data: bytes) -> int:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.opened += 1
        try:
            writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length, close = 0, False
            for line in lines[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            if length:
                await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status

    def close(self) -> None:
        for _, w in self.idle:
            w.close()
        self.idle.clear()


@dataclass
class Run:
    rate: float
    seconds: float
    restart: bool
    attempt_s: dict[int, float] = field(default_factory=dict)     # alert -> its accepted attempt
    delivered_at: dict[int, float] = field(default_factory=dict)  # alert -> time of its 202
    attempts: dict[int, int] = field(default_factory=dict)
    lag_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    restart_window: tuple[float, float] | None = None


def start_receiver(wd: Path, port: int, n: int) -> ManagedProcess:
    argv = [sys.executable, "-m", "vllm_otel", "receiver", "--config", str(wd / "policy.yaml"),
            "--port", str(port), "--token-file", str(wd / "token"), "--db-url", f"sqlite:///{wd / 'r.db'}"]
    proc = ManagedProcess(f"receiver-{n}", argv, wd / f"receiver-{n}.log").start()
    wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60, alive=proc.alive)
    return proc


def write_policy(wd: Path) -> None:
    policy = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    policy["default_mode"] = "dry-run"
    for rule in policy.get("rules", []):
        rule.pop("mode", None)
    for s in (policy.get("strategies") or {}).values():
        if isinstance(s, dict):
            s["mode"] = "dry-run"
    (wd / "policy.yaml").write_text(yaml.safe_dump(policy))


async def drive(run: Run, wd: Path, port: int, procs: list[ManagedProcess]) -> tuple[float, float]:
    total = int(run.rate * run.seconds)
    starts_at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    bodies = [request_bytes(port, json.dumps(payload(i, starts_at)).encode()) for i in range(total)]
    pool = Pool(port)
    restart_at = total // 2
    deadline = [float("inf")]

    async def send(i: int, scheduled: float) -> None:
        n = 0
        while True:
            n += 1
            t0 = time.perf_counter()
            try:
                status = await pool.post(bodies[i])
                if status == 202:
                    t1 = time.perf_counter()
                    run.attempt_s[i] = t1 - t0
                    run.delivered_at[i] = t1
                    run.attempts[i] = n
                    return
                if status < 500:
                    run.errors.append(f"alert {i}: HTTP {status}")
                    return
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                pass  # refused / reset / closed mid-answer: the receiver is restarting
            if time.perf_counter() > deadline[0]:
                run.attempts[i] = n
                return
            await asyncio.sleep(RETRY_BACKOFF_S)

    async def restart() -> None:
        t_stop = time.perf_counter()
        await asyncio.to_thread(procs[0].stop)
        procs[0] = await asyncio.to_thread(start_receiver, wd, port, 1)
        run.restart_window = (t_stop, time.perf_counter())

    tasks = []
    t_start = time.perf_counter()
    for i in range(total):
        scheduled = t_start + i / run.rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        run.lag_s.append(max(0.0, time.perf_counter() - scheduled))
        tasks.append(asyncio.create_task(send(i, scheduled)))
        if run.restart and i == restart_at:
            tasks.append(asyncio.create_task(restart()))
    deadline[0] = time.perf_counter() + GIVE_UP_S
    await asyncio.gather(*tasks)
    pool.close()
    return t_start, time.perf_counter()


def count_stored(db: Path, total: int) -> tuple[int, dict[str, int]]:
    con = sqlite3.connect(db)
    try:
        fps = {r[0] for r in con.execute("SELECT fingerprint FROM alerts")}
        jobs = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    finally:
        con.close()
    return sum(1 for i in range(total) if fingerprint(i) in fps), jobs


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=1000, method="inclusive")[int(p * 10) - 1]


def one_run(rate: float, seconds: float, restart: bool) -> dict:
    wd = Path(tempfile.mkdtemp(prefix="vllm-otel-recv-bench-"))
    (wd / "token").write_text(TOKEN)
    write_policy(wd)
    port = free_port()
    procs = [start_receiver(wd, port, 0)]
    run = Run(rate=rate, seconds=seconds, restart=restart)
    try:
        t_start, t_end = asyncio.run(drive(run, wd, port, procs))
        time.sleep(2.0)  # let the worker take some of the backlog (reported, not required)
    finally:
        procs[0].stop()  # never leave a receiver behind, even on Ctrl-C or a timeout
    total = int(rate * seconds)
    stored, jobs = count_stored(wd / "r.db", total)
    acc = sorted(run.attempt_s.values())
    steady = acc
    if run.restart_window is not None:
        lo, hi = run.restart_window[0] - 1.0, run.restart_window[1] + 2.0
        steady = sorted(v for i, v in run.attempt_s.items() if not lo <= t_start + i / rate <= hi)
    delivery = sorted(run.delivered_at[i] - (t_start + i / rate) for i in run.delivered_at)
    last = max(run.delivered_at.values()) if run.delivered_at else t_end
    return {
        "rate_offered_per_s": rate, "seconds": seconds, "restart": restart, "sent": total,
        "accepted": len(run.attempt_s), "stored": stored, "lost": total - stored,
        "http_errors": len(run.errors), "retried": sum(1 for n in run.attempts.values() if n > 1),
        "rate_sustained_per_s": len(run.attempt_s) / (last - t_start),
        "p50_ms": pct(acc, 50) * 1e3, "p99_ms": pct(acc, 99) * 1e3, "max_ms": acc[-1] * 1e3 if acc else None,
        "steady_p50_ms": pct(steady, 50) * 1e3, "steady_p99_ms": pct(steady, 99) * 1e3,
        "delivery_p50_ms": pct(delivery, 50) * 1e3, "delivery_p99_ms": pct(delivery, 99) * 1e3,
        "client_lag_p99_ms": pct(sorted(run.lag_s), 99) * 1e3,
        "restart_gap_s": None if run.restart_window is None else run.restart_window[1] - run.restart_window[0],
        "jobs_at_end": jobs, "workdir": str(wd),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,800", help="offered alerts per second, comma-separated "
                                                       "(default 200,800: the target and a ceiling)")
    ap.add_argument("--rate", type=float, help="one rate (same as --rates R)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each run (default 20)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per rate (default 1)")
    ap.add_argument("--no-restart", dest="restart", action="store_false")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    rates = [args.rate] if args.rate else [float(r) for r in args.rates.split(",")]
    results = []
    if not args.json:
        print("| offered/s | sustained/s | p50 ms | p99 ms | max ms | steady p99 ms | delivery p99 ms "
              "| lost | retried | restart gap s | client lag p99 ms | jobs done/all |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        for _ in range(args.repeat):
            out = one_run(rate, args.seconds, args.restart)
            results.append(out)
            if args.json:
                continue
            gap = "-" if out["restart_gap_s"] is None else f"{out['restart_gap_s']:.1f}"
            jobs = out["jobs_at_end"]
            print(f"| {rate:.0f} | {out['rate_sustained_per_s']:.0f} | {out['p50_ms']:.1f} | "
                  f"{out['p99_ms']:.1f} | {out['max_ms']:.0f} | {out['steady_p99_ms']:.1f} | "
                  f"{out['delivery_p99_ms']:.0f} | {out['lost']} | {out['retried']} | {gap} | "
                  f"{out['client_lag_p99_ms']:.1f} | {jobs.get('done', 0)}/{sum(jobs.values())} |",
                  flush=True)
            if out["http_errors"]:
                print(f"  ! {out['http_errors']} alerts answered with a 4xx (see {out['workdir']})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if any(r["lost"] or r["http_errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
