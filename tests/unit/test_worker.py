"""The mitigation worker's loop in an alert storm: every alert decided and recorded exactly once,
with the guards (rate limit, cooldown, one action per target, blast radius) still holding while
jobs are claimed and decided in batches.

What is real: the SQLite store, the worker with the receiver's HTTP actuator and metrics scraper,
the strategies, uvicorn. What is not: vLLM. The targets are ``vllm_otel.testing.control_standin``,
one HTTP server answering ``/metrics`` and ``/monitoring/control/<verb>`` as vLLM with the plugin
does, for many targets at once (a storm needs dozens of targets; dozens of vLLM servers do not
fit on a test host). Alerts enter through ``Store.ingest``, the receiver's group commit, as
grouped notifications of 1-50 alerts.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from datetime import datetime, timezone
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from vllm_otel.learn.learner import RuleBasedLearner
from vllm_otel.mitigate.actuators import build_actuator, build_metrics_source
from vllm_otel.mitigate.records import AlertmanagerWebhook
from vllm_otel.mitigate.policy import Policy
from vllm_otel.mitigate.store import Notification, Store
from vllm_otel.mitigate.worker import Worker
from vllm_otel.testing.control_standin import ControlStandin

CONTROL_TOKEN = "worker-test-control-token-0123456789"
NAMES = {"VllmRequestsQueueing": ["lower_queue_limits", "enable_backpressure"],
         "VllmE2eSloBurnFast": ["enable_backpressure"],
         "VllmPreemptionStorm": []}  # record only


@pytest.fixture(scope="module")
def standin() -> Iterator[ControlStandin]:
    with ControlStandin(120, CONTROL_TOKEN) as s:
        yield s


def storm_policy(tmp_path: Path, standin: ControlStandin, *, targets: range, max_actions: int = 6,
                 **worker: Any) -> Policy:
    (tmp_path / "control-token").write_text(CONTROL_TOKEN)
    return Policy.from_mapping({
        "version": 1, "default_mode": "auto",
        "targets": [{"instance": f"t{i}", "url": standin.url(i)} for i in targets],
        "rules": [{"alertname": a, "strategies": s} for a, s in NAMES.items()],
        "strategies": {n: {"params": {"verify_window_s": 0.5, "verify_interval_s": 0.1}}
                       for n in ("lower_queue_limits", "enable_backpressure")}
        | {"escalate_to_human": {"params": {"url": f"http://127.0.0.1:{standin.port}/escalate"}}},
        "actuator": {"control": {"token_file": str(tmp_path / "control-token"), "timeout_s": 10}},
        "guards": {"rate_limit": {"max_actions": max_actions, "window_s": 600}, "cooldown_s": 300},
        "worker": {"verify_delay_s": 0, "poll_s": 0.2, **worker},
    })


def storm(n_targets: int, per_target: int, offset: int, seed: int = 3) -> list[Notification]:
    """Alerts for targets offset..offset+n_targets, grouped by alert name into notifications of
    1-50 alerts, shuffled, a fifth of them sent twice (Alertmanager re-sending a group)."""
    rng = random.Random(seed)
    starts = datetime.now(timezone.utc).isoformat()
    by_name: dict[str, list[dict[str, Any]]] = {n: [] for n in NAMES}
    for t in range(offset, offset + n_targets):
        for k in range(per_target):
            name = list(NAMES)[k % len(NAMES)]
            by_name[name].append({"status": "firing", "fingerprint": f"fp-{t}-{k}",
                                  "labels": {"alertname": name, "instance": f"t{t}", "model": f"m{k}"},
                                  "startsAt": starts})
    hooks = []
    for name, alerts in by_name.items():
        i = 0
        while i < len(alerts):
            size = rng.randint(1, 50)
            hooks.append({"version": "4", "groupKey": f"{name}-{i}", "status": "firing",
                          "receiver": "vllm-otel", "alerts": alerts[i:i + size]})
            i += size
    rng.shuffle(hooks)
    hooks += rng.sample(hooks, len(hooks) // 5)
    return [Notification(hook=AlertmanagerWebhook.model_validate(h), received_at=0.0) for h in hooks]


def run_storm(tmp_path: Path, policy: Policy, notes: list[Notification]) -> sqlite3.Connection:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for n in notes:
        store.ingest([Notification(hook=n.hook, received_at=time.time())])
    worker = Worker(policy, store, actuator=build_actuator(policy),
                    metrics_source=build_metrics_source(policy), learner=RuleBasedLearner())

    async def drain() -> int:
        total = 0
        while True:  # drain() returns when nothing is claimable; jobs may be deferred meanwhile
            total += await worker.drain()
            counts = store.job_counts()
            if counts["pending"] == 0 and counts["running"] == 0:
                return total

    asyncio.run(asyncio.wait_for(drain(), 120))
    store.close()
    return sqlite3.connect(tmp_path / "r.db")


def test_a_storm_ends_with_every_alert_decided_and_recorded_once(tmp_path: Path,
                                                                 standin: ControlStandin) -> None:
    targets = range(0, 40)
    fleet = range(0, 100)  # 40 % of the fleet alerts: under the blast radius, the guards decide
    before = standin.calls()
    notes = storm(len(targets), 6, targets.start)
    policy = storm_policy(tmp_path, standin, targets=fleet, max_actions=6, decide_batch=16)
    db = run_storm(tmp_path, policy, notes)
    distinct = {a.dedupe_key for n in notes for a in n.hook.alerts}
    assert len(distinct) == 240 and sum(len(n.hook.alerts) for n in notes) > 240  # resends deduped
    assert db.execute("SELECT count(*) FROM alerts").fetchone()[0] == 240
    jobs = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert jobs == {"done": 240}
    # Each job: exactly one decision of its own, finished exactly once, with one outcome row.
    per_job = Counter(r[0] for r in db.execute("SELECT job_id FROM actions WHERE job_id IS NOT NULL"))
    assert len(per_job) == 240 and set(per_job.values()) == {1}
    assert db.execute("SELECT count(*) FROM actions a WHERE (SELECT count(*) FROM action_events e "
                      "WHERE e.action_id = a.id AND e.kind = 'finished') != 1").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM outcomes").fetchone()[0] == \
        db.execute("SELECT count(*) FROM actions").fetchone()[0]
    outcomes = dict(db.execute("SELECT outcome, count(*) FROM outcomes GROUP BY outcome").fetchall())
    executed = outcomes.get("success", 0) + outcomes.get("no_effect", 0) + outcomes.get("failure", 0)
    # The rate limit held across batches: 6 actions, and each reached its target once.
    assert executed == 6 and outcomes.get("success") == 6
    after = standin.calls()
    reached = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert sum(v for k, v in reached.items() if k != "escalate") == 6
    started = db.execute("SELECT a.target, a.strategy FROM action_events e JOIN actions a ON "
                         "a.id = e.action_id WHERE e.kind = 'started'").fetchall()
    assert len(started) == len(set(started)) == 6  # cooldown: never twice on one target
    assert outcomes["skipped"] == 80  # VllmPreemptionStorm: record only, 2 per target
    assert outcomes["blocked"] == 240 - 80 - 6


def test_a_storm_over_most_of_the_fleet_is_stopped_by_the_blast_radius(tmp_path: Path,
                                                                        standin: ControlStandin) -> None:
    policy = storm_policy(tmp_path, standin, targets=range(40, 70), max_actions=50, decide_batch=32)
    before = standin.calls()
    db = run_storm(tmp_path, policy, storm(30, 3, 40))  # every target of the fleet alerts
    assert dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()) == {"done": 90}
    blocked = db.execute("SELECT count(*) FROM outcomes o JOIN actions a ON a.id = o.action_id "
                         "WHERE a.job_id IS NOT NULL AND o.outcome = 'blocked' AND "
                         "o.detail LIKE 'blast radius:%'").fetchone()[0]
    assert blocked == 90  # all alerts were stored before the worker looked: none may act
    after = standin.calls()
    assert {k for k in after if after[k] != before.get(k, 0)} <= {"escalate"}  # no target touched
    # Escalations: each blocked alert asks, a human is told once per target (the escalation's
    # cooldown blocks the rest), and every escalation reached the pager hook.
    esc = dict(db.execute("SELECT o.outcome, count(DISTINCT a.target) || '/' || count(*) FROM outcomes o "
                          "JOIN actions a ON a.id = o.action_id WHERE a.strategy = 'escalate_to_human' "
                          "GROUP BY 1").fetchall())
    assert esc == {"success": "30/30", "blocked": "30/60"}
    assert after.get("escalate", 0) - before.get("escalate", 0) == 30


def test_actions_run_at_most_concurrency_at_once_and_decisions_go_on_meanwhile(
        tmp_path: Path, standin: ControlStandin) -> None:
    """worker.concurrency bounds the actions running (here 2, each verifying for 2 s); the other
    jobs, claimed and decided 4 at a time, are all decided before the first action is done."""
    policy = storm_policy(tmp_path, standin, targets=range(70, 120), max_actions=6, concurrency=2,
                          decide_batch=4, verify_delay_s=2.0)
    db = run_storm(tmp_path, policy, storm(20, 3, 70))
    assert dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()) == {"done": 60}
    executed = sorted(r[0] for r in db.execute("SELECT at FROM outcomes WHERE outcome = 'success'"))
    assert len(executed) == 6
    assert executed[-1] - executed[0] >= 3.0  # three waves of two: no more than two at once
    others = db.execute("SELECT max(at) FROM outcomes WHERE outcome != 'success'").fetchone()[0]
    late = db.execute("SELECT o.outcome, o.detail, o.at - ? FROM outcomes o WHERE o.outcome != 'success' AND o.at > ?", (executed[0], executed[0])).fetchall()
    assert others < executed[0], late
