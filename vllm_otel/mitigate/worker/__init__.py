"""The mitigation worker: takes alert jobs from the store and turns each into one guarded,
verified action (or a recorded reason not to act), then hands the outcome to the learner.

One decision at a time across all replicas: guard checks and the action's 'started' record are
taken under a lease in the store, so the rate limit and cooldowns hold with several replicas.
The action itself runs outside that lease, holding only its target (one action per target).
An action that may have half-happened is never re-run: a runner that dies mid-action leaves it
``interrupted`` for the learner and the audit trail.

Deciding happens in batches (one hold of the lease, shared fleet-wide guard reads) and is a
pure function (:mod:`vllm_otel.mitigate.decide`); the parts: ``loop`` (claiming, pacing,
resuming, shutdown), ``decisions``, ``acting``, ``metrics``, ``base`` (what they share).
"""

from vllm_otel.mitigate.worker.loop import Worker
from vllm_otel.mitigate.worker.metrics import MitigationMetrics

__all__ = ["Worker", "MitigationMetrics"]
