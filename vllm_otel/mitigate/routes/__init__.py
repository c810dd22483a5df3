"""The receiver's HTTP API, one module per thing it serves; :func:`api_routes` lists them all.

- :mod:`.intake`: ``POST /webhook`` (Alertmanager's notifications; the intake token)
- :mod:`.actions`: ``POST /actions/{id}/approve`` and ``/reject`` (operators)
- :mod:`.audit`: ``GET /actions``, ``GET /actions/{id}``, ``GET /learner`` (operators)
- :mod:`.killswitch`: ``GET`` and ``POST /killswitch`` (operators)
- :mod:`.health`: ``GET /healthz`` and ``GET /metrics`` (no credential: probes and Prometheus)

Handlers are plain module-level functions; what they act on, the
:class:`~vllm_otel.mitigate.receiver.Receiver` (store, worker, policy, credentials), is
``request.app.state.receiver``, set by :func:`~vllm_otel.mitigate.receiver.create_app`.
"""

from __future__ import annotations

from starlette.routing import Route

from vllm_otel.mitigate.routes import actions, audit, health, intake, killswitch

__all__ = ["api_routes"]


def api_routes() -> list[Route]:
    """Every API route of the receiver (the approvals page under /ui is added by create_app)."""
    return [
        Route("/webhook", intake.webhook, methods=["POST"]),
        Route("/actions", audit.list_actions, methods=["GET"]),
        Route("/actions/{action_id:int}", audit.get_action, methods=["GET"]),
        Route("/actions/{action_id:int}/approve", actions.approve, methods=["POST"]),
        Route("/actions/{action_id:int}/reject", actions.reject, methods=["POST"]),
        Route("/killswitch", killswitch.get_kill_switch, methods=["GET"]),
        Route("/killswitch", killswitch.set_kill_switch, methods=["POST"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Route("/learner", audit.learner, methods=["GET"]),
        Route("/healthz", health.healthz, methods=["GET"]),
    ]
