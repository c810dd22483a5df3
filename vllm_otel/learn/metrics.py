"""The learner's series on the receiver's ``/metrics`` (the mitigation dashboard reads them).

* ``vllm_otel_learner_selections_total{failure_type,strategy}``: times the learner chose it;
* ``vllm_otel_learner_outcomes_total{failure_type,strategy,outcome}``: outcomes it took in;
* ``vllm_otel_learner_success_probability{failure_type,strategy}``: posterior mean probability of
  success over the failure type (computed at scrape time from what the learner holds).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

__all__ = ["LearnerMetrics"]

log = logging.getLogger(__name__)


def _family(state: Mapping[str, Any]) -> str:
    return str(state.get("failure_type") or state.get("alertname") or "unknown")


class _Scores:
    def __init__(self, learner: Callable[[], Any], lock: threading.Lock) -> None:
        self.learner, self.lock = learner, lock

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("vllm_otel_learner_success_probability",
                              "the learner's posterior mean probability that the strategy succeeds "
                              "on this failure type", labels=["failure_type", "strategy"])
        lrn = self.learner()
        scores = getattr(lrn, "scores", None)
        if callable(scores):
            try:
                with self.lock:
                    rows = list(scores())
            except Exception:  # noqa: BLE001 - a scrape must not fail because of the learner
                log.exception("learner scores unavailable")
                rows = []
            for fam, strategy, p in rows:
                g.add_metric([fam, strategy], float(p))
        yield g


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry, learner: Callable[[], Any],
                 lock: threading.Lock) -> None:
        self.selections = Counter("vllm_otel_learner_selections", "times the learner chose the strategy",
                                  ["failure_type", "strategy"], registry=registry)
        self.outcomes = Counter("vllm_otel_learner_outcomes",
                                "outcomes of the strategy the learner took in",
                                ["failure_type", "strategy", "outcome"], registry=registry)
        registry.register(_Scores(learner, lock))  # type: ignore[arg-type]

    def selected(self, state: Mapping[str, Any], strategy: str) -> None:
        self.selections.labels(_family(state), strategy).inc()

    def outcome(self, state: Mapping[str, Any], strategy: str | None, outcome: str) -> None:
        if strategy is not None:
            self.outcomes.labels(_family(state), strategy, outcome).inc()
