"""Dashboard 3: mitigation and learning (``vllm-otel receiver``'s series and the learner's)."""

from __future__ import annotations

from typing import Any

from vllm_otel.dashboards.common import ANNOTATIONS, RI
from vllm_otel.dashboards.grafana import (bargauge, dashboard, query_variable, row, stat, table, target,
                                          timeseries)

__all__ = ["UID", "build"]

UID = "vllm-otel-mitigation"
R = 'job=~"$job"'
EXECUTED = "success|failure|no_effect|interrupted"  # outcomes of actions that really ran


def _rate(metric: str, by: str = "", extra: str = "") -> str:
    sel = R + (f", {extra}" if extra else "")
    return f"sum{f' by ({by})' if by else ''} (rate({metric}{{{sel}}}[{RI}]))"


def _inc(metric: str, by: str, extra: str = "") -> str:
    sel = R + (f", {extra}" if extra else "")
    return f"sum by ({by}) (increase({metric}{{{sel}}}[$__range]))"


def _overview() -> row:
    return row("Overview", [
        stat("Kill switch", "1 while the kill switch stops every action (policy file or API).",
             [target(f"max (vllm_otel_mitigation_kill_switch{{{R}}})")], "none",
             steps=[(None, "green"), (1, "red")],
             mappings=[{"type": "value", "options": {"0": {"text": "off"}, "1": {"text": "ON"}}}]),
        stat("Open circuit breakers", "Strategies switched off after repeated failures.",
             [target(f"sum (vllm_otel_mitigation_circuit_open{{{R}}})")], "none",
             steps=[(None, "green"), (1, "red")]),
        stat("Store up", "1 when the receiver's database answered the last scrape.",
             [target(f"min (vllm_otel_receiver_store_up{{{R}}})")], "none", steps=[(None, "red"), (1, "green")]),
        stat("Waiting for approval", "Proposed actions a human must approve or reject.",
             [target(f'sum (vllm_otel_receiver_jobs{{{R}, state="waiting_approval"}}) or vector(0)')], "none",
             steps=[(None, "green"), (1, "orange")]),
        stat("Success rate", "Verified successes / executed actions over the dashboard's range.",
             [target(f'sum (increase(vllm_otel_mitigations_total{{{R}, outcome="success"}}[$__range])) / '
                     f'sum (increase(vllm_otel_mitigations_total{{{R}, outcome=~"{EXECUTED}"}}[$__range]))')],
             "percentunit", steps=[(None, "red"), (0.5, "orange"), (0.8, "green")]),
        stat("Worker heartbeat age", "Seconds since the receiver's background worker last ran.",
             [target(f"time() - max (vllm_otel_receiver_worker_heartbeat_timestamp_seconds{{{R}}})")], "s",
             steps=[(None, "green"), (30, "orange"), (120, "red")]),
    ])


def _actions() -> row:
    return row("Actions", [
        timeseries("Jobs by state", "Mitigation jobs in the store by state (shared by all replicas).",
                   [target(f"max by (state) (vllm_otel_receiver_jobs{{{R}}})", "{{state}}")], "none", w=8, min=0),
        timeseries("Outcomes by strategy", "Finished mitigation decisions per second, by strategy and outcome.",
                   [target(_rate("vllm_otel_mitigations_total", "strategy, outcome"), "{{strategy}} {{outcome}}")],
                   "ops", w=8, min=0, stack=True),
        timeseries("Action duration", "p50/p95 of execute + verify time of executed actions, by strategy.",
                   [target(f"histogram_quantile({q}, sum by (le, strategy) "
                           f"(rate(vllm_otel_mitigation_action_duration_seconds_bucket{{{R}}}[{RI}])))",
                           f"p{int(q * 100)} {{{{strategy}}}}") for q in (0.5, 0.95)], "s", w=8, min=0),
        table("Outcomes over the range", "Decisions per strategy and outcome over the dashboard's range.",
              [target(_inc("vllm_otel_mitigations_total", "strategy, outcome"), instant=True, table=True)],
              "none", w=8, organize={"excludeByName": {"Time": True}, "renameByName": {"Value": "decisions"}}),
        bargauge("Guard decisions", "Guard checks over the range, by guard and decision (deny = the guard "
                 "stopped a strategy or the whole alert).",
                 [target(_inc("vllm_otel_mitigation_guard_decisions_total", "guard, decision"),
                         "{{guard}} {{decision}}", instant=True)], "none", w=8),
        timeseries("Escalations / s", "Times automation stopped and asked a human, by reason.",
                   [target(f"{_rate('vllm_otel_mitigation_escalations_total', 'reason')} or vector(0)",
                           "{{reason}}")], "ops", w=8, min=0),
        timeseries("Open circuit breakers", "1 while a strategy's circuit breaker is open.",
                   [target(f"max by (strategy) (vllm_otel_mitigation_circuit_open{{{R}}})", "{{strategy}}")],
                   "none", w=12, min=0, max=1),
        timeseries("Kill switch", "1 while the kill switch stops every action.",
                   [target(f"max (vllm_otel_mitigation_kill_switch{{{R}}})", "kill switch")], "none", w=12,
                   min=0, max=1),
    ])


def _intake() -> row:
    return row("Webhook intake", [
        timeseries("Webhooks / s by status", "POST /webhook answers by HTTP status (202 stored; 503 "
                   "Alertmanager retries).",
                   [target(_rate("vllm_otel_receiver_webhooks_total", "code"), "{{code}}")], "reqps", w=8,
                   min=0, stack=True),
        timeseries("Webhook latency", "p50/p99 of POST /webhook inside the receiver.",
                   [target(f"histogram_quantile({q}, sum by (le) "
                           f"(rate(vllm_otel_receiver_webhook_duration_seconds_bucket{{{R}}}[{RI}])))",
                           f"p{int(q * 100)}") for q in (0.5, 0.99)], "s", w=8, min=0),
        timeseries("Alerts / s", "Alerts received by status (firing, resolved) and what became of them.",
                   [target(_rate("vllm_otel_receiver_alerts_total", "status, result"), "{{status}} {{result}}")],
                   "ops", w=8, min=0, stack=True),
        timeseries("Receiver errors / s", "Store failures, worker errors and alerts Alertmanager truncated.",
                   [target(_rate("vllm_otel_receiver_store_errors_total"), "store errors"),
                    target(_rate("vllm_otel_receiver_worker_errors_total"), "worker errors"),
                    target(_rate("vllm_otel_receiver_truncated_alerts_total"), "truncated alerts")],
                   "ops", w=24, h=6, min=0),
    ])


def _learning() -> row:
    return row("Learning", [
        timeseries("Selections / s", "Strategies the learner chose, by failure type.",
                   [target(_rate("vllm_otel_learner_selections_total", "failure_type, strategy"),
                           "{{failure_type}} {{strategy}}")], "ops", w=8, min=0, stack=True),
        timeseries("Success probability", "The learner's estimate that a strategy fixes a failure type.",
                   [target(f"max by (failure_type, strategy) (vllm_otel_learner_success_probability{{{R}}})",
                           "{{failure_type}} {{strategy}}")], "percentunit", w=8, min=0, max=1),
        table("Learned outcomes", "Outcomes the learner was told, by failure type, strategy and outcome, "
              "over the range.",
              [target(_inc("vllm_otel_learner_outcomes_total", "failure_type, strategy, outcome"),
                      instant=True, table=True)], "none", w=8,
              organize={"excludeByName": {"Time": True}, "renameByName": {"Value": "outcomes"}}),
    ])


def build() -> dict[str, Any]:
    job = query_variable("job", "Receiver job", "label_values(vllm_otel_receiver_store_up, job)")
    return dashboard(UID, "vLLM mitigation and learning", "What the mitigation receiver decided and did, "
                     "its guards, escalations and intake, and what the learner has learned.",
                     ["vllm", "mitigation"], [job], [_overview(), _actions(), _intake(), _learning()],
                     ANNOTATIONS)
