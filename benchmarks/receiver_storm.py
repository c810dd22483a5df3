"""Mitigation receiver in an alert storm: intake latency during it, and how long until every alert
is decided after it.

A real ``vllm-otel receiver`` process (uvicorn, SQLite store, token auth, its background worker)
gets ``--alerts`` distinct alerts (default 5,000) over ``--targets`` targets (default 500, 10
alerts each: 5 alert names x 2 models) within ``--seconds`` (default 10), as Alertmanager sends
them: grouped webhooks of 1-50 alerts (one alert name per group), and ``--resend`` of the
webhooks (default 20 %) sent again later in the storm, as Alertmanager re-sends a group (those
alerts are deduped by the receiver). The policy runs every strategy in ``auto`` mode with the
example policy's guards (rate limit 10 actions / 10 min, cooldown 300 s, blast radius 50 %,
circuit breaker), so the worker really acts, verifies and is really stopped by its guards.

The targets are real HTTP endpoints: ``vllm_otel.testing.control_standin``, a stand-in that
answers like vLLM with the vllm-otel plugin (``/metrics`` with the series the strategies read,
``POST /monitoring/control/set_queue_limits`` with a bearer token, ``{"before", "after"}``) for
each target under ``/t<i>`` of one port, run as its own process; hundreds of real vLLM servers
do not fit on this host. Its ``POST /escalate`` is the pager hook of ``escalate_to_human``. The
fleet is ``--fleet`` targets (default 1,000): the storm hits half of it, which the blast radius
guard (more than 50 %) still lets through, so decisions go all the way to the rate limit; with
``--fleet 500`` the blast radius stops (and escalates) nearly everything instead.

What it prints:

* ``intake p50/p99/max``: POST -> 202 of every webhook of the storm (one HTTP attempt, client
  side, loopback), and the receiver's own histogram (``server p99``);
* ``decided``: alerts (distinct) whose job is finished and whose every action has its outcome
  recorded (acted on, dry-run, blocked by a guard, skipped, cancelled, escalated), read from the
  receiver's SQLite file every 0.25 s;
* ``all decided after``: seconds from the storm's last 202 until every alert is decided
  (target <= 60 s); ``worker CPU``: the receiver's CPU from the storm's start until then;
* outcome counts of every recorded action (``escalate`` rows are escalation actions), control
  calls and escalations that reached the stand-in, alerts deduped at intake.

    .venv/bin/python benchmarks/receiver_storm.py                        # 5,000 alerts, 500 targets
    .venv/bin/python benchmarks/receiver_storm.py --decide-batch 1,64           # batching side by side
    .venv/bin/python benchmarks/receiver_storm.py --alerts 1000 --targets 100 --json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import receiver_load as rl  # noqa: E402  (Pool, the receiver's start, the histogram helpers)

from vllm_otel.testing.processes import ManagedProcess, free_port, wait_http  # noqa: E402

TARGET_INTAKE_P99_MS = 5.0
TARGET_DECIDED_S = 60.0
ALERTNAMES = ("VllmRequestsQueueing", "VllmKvCacheNearlyFull", "VllmTtftSloBurnFast",
              "VllmE2eSloBurnFast", "VllmPreemptionStorm")
RULES = {"VllmRequestsQueueing": ["lower_queue_limits", "enable_backpressure"],
         "VllmKvCacheNearlyFull": ["enable_backpressure", "lower_queue_limits"],
         "VllmTtftSloBurnFast": ["lower_queue_limits"],
         "VllmE2eSloBurnFast": ["enable_backpressure"],
         "VllmPreemptionStorm": []}  # record only


def instance(i: int) -> str:
    return f"standin-{i}:8000"


def write_policy(wd: Path, standin_port: int, fleet: int, decide_batch: int | None = None) -> None:
    example = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    (wd / "control-token").write_text("storm-control-token-0123456789\n")
    policy = {
        "version": 1, "target_label": "instance", "default_mode": "auto",
        "targets": [{"instance": instance(i), "url": f"http://127.0.0.1:{standin_port}/t{i}"}
                    for i in range(fleet)],
        "rules": [{"alertname": a, "strategies": s} for a, s in RULES.items()],
        "strategies": {"escalate_to_human": {"params": {"url": f"http://127.0.0.1:{standin_port}/escalate"}}},
        "actuator": {"control": {"token_file": str(wd / "control-token"), "timeout_s": 10}},
        "guards": example["guards"], "escalation": example["escalation"], "worker": dict(example["worker"]),
    }
    if decide_batch is not None:
        policy["worker"]["decide_batch"] = decide_batch
    (wd / "policy.yaml").write_text(yaml.safe_dump(policy))


def build_storm(n_alerts: int, n_targets: int, resend: float, seed: int) -> tuple[list[dict], int]:
    """Webhook payloads in send order and the number of alerts in them (resends included)."""
    rng = random.Random(seed)
    starts_at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    by_name: dict[str, list[dict]] = {a: [] for a in ALERTNAMES}
    for n in range(n_alerts):
        t, k = n % n_targets, n // n_targets
        name = ALERTNAMES[k % len(ALERTNAMES)]
        labels = {"alertname": name, "instance": instance(t), "model_name": f"m{k // len(ALERTNAMES)}",
                  "severity": "warning", "job": "vllm"}
        fp = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
        by_name[name].append({"status": "firing", "labels": labels, "annotations": {"summary": "storm"},
                              "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z",
                              "generatorURL": "http://prom:9090/graph", "fingerprint": fp})
    hooks = []
    for name, alerts in by_name.items():
        rng.shuffle(alerts)
        i = g = 0
        while i < len(alerts):
            size = rng.randint(1, 50)
            chunk = alerts[i:i + size]
            i += size
            g += 1
            hooks.append({"version": "4", "groupKey": f'{{}}:{{alertname="{name}", zone="z{g}"}}',
                          "truncatedAlerts": 0, "status": "firing", "receiver": "vllm-otel",
                          "groupLabels": {"alertname": name, "zone": f"z{g}"}, "commonLabels": {"alertname": name},
                          "commonAnnotations": {}, "externalURL": "http://am:9093", "alerts": chunk})
    rng.shuffle(hooks)
    for h in rng.sample(hooks, int(len(hooks) * resend)):  # a group re-sent later in the storm
        hooks.insert(rng.randint(hooks.index(h) + 1, len(hooks)), h)
    return hooks, sum(len(h["alerts"]) for h in hooks)


def decided_state(db: Path) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        jobs = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        open_actions = con.execute(
            "SELECT count(*) FROM actions a WHERE NOT EXISTS (SELECT 1 FROM action_events e "
            "WHERE e.action_id = a.id AND e.kind = 'finished') AND a.mode != 'approval'").fetchone()[0]
        alerts = con.execute("SELECT count(*) FROM alerts").fetchone()[0]
    finally:
        con.close()
    undecided = jobs.get("pending", 0) + jobs.get("running", 0)
    return {"jobs": jobs, "open_actions": open_actions, "alerts": alerts,
            "decided": sum(jobs.values()) - undecided, "all_decided": undecided == 0 and open_actions == 0}


def outcome_counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT CASE WHEN strategy = 'escalate_to_human' THEN 'escalate: ' || outcome "
                           "ELSE outcome END, count(*) FROM outcomes GROUP BY 1 ORDER BY 2 DESC").fetchall()
        dup = con.execute("SELECT count(*) FROM (SELECT alert_id FROM outcomes o JOIN actions a ON "
                          "a.id = o.action_id WHERE a.job_id IS NOT NULL GROUP BY a.job_id "
                          "HAVING count(*) > 1)").fetchone()[0]
    finally:
        con.close()
    out = dict(rows)
    out["jobs with more than one outcome"] = dup
    return out


async def send_storm(port: int, hooks: list[dict], seconds: float) -> tuple[list[float], list[str], float]:
    bodies = [rl.request_bytes(port, json.dumps(h).encode()) for h in hooks]
    pool = rl.Pool(port)
    lat: list[float] = []
    errors: list[str] = []

    async def send(b: bytes) -> None:
        for _ in range(20):
            t0 = time.perf_counter()
            try:
                status = await pool.post(b)
            except (OSError, asyncio.IncompleteReadError) as e:
                errors.append(f"{type(e).__name__}")
                await asyncio.sleep(0.5)
                continue
            if status == 202:
                lat.append(time.perf_counter() - t0)
                return
            errors.append(f"HTTP {status}")
            if status < 500:
                return
            await asyncio.sleep(0.5)

    tasks = []
    t_start = time.perf_counter()
    for i, b in enumerate(bodies):
        delay = t_start + i * seconds / len(bodies) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(b)))
    await asyncio.gather(*tasks)
    pool.close()
    return lat, errors, time.perf_counter()


def run(args: argparse.Namespace, decide_batch: int | None = None) -> dict:
    wd = Path(tempfile.mkdtemp(prefix="vllm-otel-storm-"))
    (wd / "token").write_text(rl.TOKEN)
    sport = free_port()
    write_policy(wd, sport, max(args.fleet, args.targets), decide_batch)
    standin = ManagedProcess("control-standin", [sys.executable, "-m", "vllm_otel.testing.control_standin",
                                                 "--targets", str(max(args.fleet, args.targets)),
                                                 "--port", str(sport), "--token-file",
                                                 str(wd / "control-token")], wd / "standin.log", cwd=ROOT).start()
    procs: list[ManagedProcess] = []
    try:
        wait_http(f"http://127.0.0.1:{sport}/calls", timeout_s=60, alive=standin.alive)
        port = free_port()
        procs.append(rl.start_receiver(wd, port, 0, list(args.receiver_arg or [])))
        hooks, n_sent = build_storm(args.alerts, args.targets, args.resend, args.seed)
        cpu0 = rl.cpu_s(procs[0].pid)
        spy = None
        if args.profile:  # py-spy (dev tool: pip install py-spy), collapsed stacks of every thread
            import subprocess
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(procs[0].pid), "--format", "raw",
                                    "--rate", "200", "--nonblocking", "-o", args.profile],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lat, errors, t_end = asyncio.run(send_storm(port, hooks, args.seconds))
        hist = rl.server_histogram(port)
        db = wd / "r.db"
        state = decided_state(db)
        decided_after = None
        while time.perf_counter() - t_end < args.timeout:
            state = decided_state(db)
            if state["all_decided"] and state["alerts"] >= args.alerts:
                decided_after = time.perf_counter() - t_end
                break
            time.sleep(0.25)
        cpu = rl.cpu_s(procs[0].pid) - cpu0
        if spy is not None:
            import signal
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        calls = httpx.get(f"http://127.0.0.1:{sport}/calls", timeout=10).json()
    finally:
        for p in procs:
            p.stop()
        standin.stop()
    lat.sort()
    return {
        "decide_batch": decide_batch, "alerts": args.alerts, "targets": args.targets, "fleet": max(args.fleet, args.targets),
        "webhooks": len(hooks), "alerts_sent": n_sent, "storm_s": args.seconds,
        "intake_p50_ms": rl.pct(lat, 50) * 1e3, "intake_p99_ms": rl.pct(lat, 99) * 1e3,
        "intake_max_ms": lat[-1] * 1e3 if lat else None,
        "server_p99_ms": rl.hist_quantile(hist, 0.99) * 1e3, "http_errors": len(errors),
        "alerts_stored": state["alerts"], "deduped_at_intake": n_sent - state["alerts"],
        "decided": state["decided"], "jobs": state["jobs"], "open_actions": state["open_actions"],
        "all_decided_after_s": decided_after, "receiver_cpu_s": cpu,
        "outcomes": outcome_counts(db), "control_calls": sum(v for k, v in calls.items() if k != "escalate"),
        "escalations_sent": calls.get("escalate", 0), "workdir": str(wd),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alerts", type=int, default=5000)
    ap.add_argument("--targets", type=int, default=500)
    ap.add_argument("--fleet", type=int, default=1000, help="configured targets (>= --targets)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the storm")
    ap.add_argument("--resend", type=float, default=0.2, help="share of webhooks sent twice")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up waiting for decisions after")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--receiver-arg", action="append", help="extra argument for the receiver")
    ap.add_argument("--decide-batch", default="",
                    help="worker.decide_batch values to run one after another, comma-separated "
                         "(default: the example policy's); 1,64 shows batching side by side")
    ap.add_argument("--profile", help="write py-spy's collapsed stacks of the receiver to this file")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.decide_batch.split(",") if b] or [None]
    outs = [run(args, b) for b in batches]
    if args.json:
        print(json.dumps(outs, indent=2))
        return 0
    print("| decide_batch | alerts (targets, fleet) | webhooks (alerts sent) | storm s | intake p50 ms "
          "| intake p99 ms | intake max ms | server p99 ms | deduped | decided | all decided after s "
          "| receiver CPU s |")
    print("|" + "---|" * 12)
    for out in outs:
        after = out["all_decided_after_s"]
        print(f"| {out['decide_batch'] or 'policy'} | {out['alerts']} ({out['targets']}, {out['fleet']}) "
              f"| {out['webhooks']} ({out['alerts_sent']}) | {out['storm_s']:.0f} | {out['intake_p50_ms']:.1f} "
              f"| {out['intake_p99_ms']:.1f} | {out['intake_max_ms']:.0f} | {out['server_p99_ms']:.1f} "
              f"| {out['deduped_at_intake']} | {out['decided']}/{out['alerts_stored']} "
              f"| {'-' if after is None else f'{after:.1f}'} | {out['receiver_cpu_s']:.1f} |")
    for out in outs:
        after = out["all_decided_after_s"]
        print(f"\ndecide_batch {out['decide_batch'] or 'policy'}: outcomes: "
              + ", ".join(f"{k} {v}" for k, v in out["outcomes"].items()))
        print(f"  control calls that reached targets: {out['control_calls']}; escalations sent: "
              f"{out['escalations_sent']}; HTTP errors at intake: {out['http_errors']}")
        print(f"  targets: intake p99 <= {TARGET_INTAKE_P99_MS:.0f} ms: "
              f"{'met' if out['intake_p99_ms'] <= TARGET_INTAKE_P99_MS else 'NOT met'}; all decided within "
              f"{TARGET_DECIDED_S:.0f} s: {'met' if after is not None and after <= TARGET_DECIDED_S else 'NOT met'}")
    return 0 if all(o["all_decided_after_s"] is not None for o in outs) else 1


if __name__ == "__main__":
    sys.exit(main())
