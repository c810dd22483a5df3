"""Everything the receiver exports on /metrics (the worker's and the HTTP side's)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from vllm_otel.mitigate.worker.loop import Worker


log = logging.getLogger(__name__)


class _StoreCollector:
    """Facts that live in the store (shared by replicas), read at scrape time."""

    def __init__(self, worker: "Worker") -> None:
        self.r = worker

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily("vllm_otel_receiver_store_up", "1 when the store answered this scrape")
        try:
            self.r.store.ping()  # the write side: reads may still be served from open connections
            circuit = GaugeMetricFamily(
                "vllm_otel_mitigation_circuit_open",
                "1 while the strategy's circuit breaker is open (repeated failures): page a human",
                labels=["strategy"])
            for name in self.r.policy.strategy_names():
                circuit.add_metric([name], 1.0 if self.r.guards.circuit(name).open else 0.0)
            kill = GaugeMetricFamily("vllm_otel_mitigation_kill_switch",
                                     "1 while the kill switch stops every action")
            kill.add_metric([], 0.0 if self.r.guards.kill_switch().ok else 1.0)
            jobs = GaugeMetricFamily("vllm_otel_receiver_jobs", "mitigation jobs by state",
                                     labels=["state"])
            for state, n in self.r.store.job_counts().items():
                jobs.add_metric([state], float(n))
            up.add_metric([], 1.0)
            yield from (circuit, kill, jobs, up)
        except Exception:  # noqa: BLE001 - a scrape must still say the store is down
            log.exception("store unavailable during scrape")
            up.add_metric([], 0.0)
            yield up


class MitigationMetrics:
    """Everything the receiver exports on /metrics (the worker's and the HTTP side's)."""

    def __init__(self, registry: CollectorRegistry, worker: "Worker") -> None:
        self.registry = registry
        self.mitigations = Counter("vllm_otel_mitigations", "finished mitigation decisions",
                                   ["strategy", "outcome"], registry=registry)
        self.guard_decisions = Counter("vllm_otel_mitigation_guard_decisions",
                                       "guard checks recorded with a decision, by guard and decision "
                                       "(allow, deny)", ["guard", "decision"], registry=registry)
        self.escalations = Counter("vllm_otel_mitigation_escalations",
                                   "times automation stopped and asked for a human", ["reason"],
                                   registry=registry)
        self.action_seconds = Histogram("vllm_otel_mitigation_action_duration_seconds",
                                        "execute + verify time of executed actions", ["strategy"],
                                        buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                        registry=registry)
        self.webhooks = Counter("vllm_otel_receiver_webhooks", "webhook requests by HTTP status",
                                ["code"], registry=registry)
        self.webhook_seconds = Histogram(
            "vllm_otel_receiver_webhook_duration_seconds",
            "POST /webhook in the receiver: request handed to the app -> answer ready (202: stored "
            "and committed)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry)
        self.alerts = Counter("vllm_otel_receiver_alerts", "alerts received",
                              ["status", "result"], registry=registry)
        self.truncated = Counter("vllm_otel_receiver_truncated_alerts",
                                 "alerts Alertmanager left out of notifications (max_alerts)",
                                 registry=registry)
        self.store_errors = Counter("vllm_otel_receiver_store_errors",
                                    "store failures while handling webhooks", registry=registry)
        self.worker_errors = Counter("vllm_otel_receiver_worker_errors",
                                     "unexpected errors in the background worker", registry=registry)
        self.heartbeat = Gauge("vllm_otel_receiver_worker_heartbeat_timestamp_seconds",
                               "last time the worker loop ran", registry=registry)
        registry.register(_StoreCollector(worker))  # type: ignore[arg-type]

