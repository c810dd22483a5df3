"""Mitigation strategies: one small module per action, all registered in :data:`REGISTRY`.

Importing this package imports every built-in strategy module listed in ``_BUILTIN_MODULES`` so
that the registry is complete; add a new module's name there.
"""

from __future__ import annotations

import importlib

from vllm_otel.mitigate.strategies.base import (REGISTRY, ActionResult, Actuator, ActuatorError,
                                                Check, MetricsSnapshot, MetricsSource, NoParams,
                                                Strategy, StrategyConfigError, StrategyContext,
                                                StrategyParams, StrategyRegistry,
                                                UnavailableActuator, Verification,
                                                register_strategy)

__all__ = [
    "REGISTRY", "ActionResult", "Actuator", "ActuatorError", "Check", "MetricsSnapshot",
    "MetricsSource", "NoParams", "Strategy", "StrategyConfigError", "StrategyContext",
    "StrategyParams", "StrategyRegistry", "UnavailableActuator", "Verification",
    "register_strategy",
]

# Modules whose import registers built-in strategies (least invasive first, for readers).
_BUILTIN_MODULES = (
    "vllm_otel.mitigate.strategies.escalate",      # a human (touches nothing)
    "vllm_otel.mitigate.strategies.live_limits",   # control endpoints: admission and batch limits
    "vllm_otel.mitigate.strategies.live_engine",   # control endpoints: caches, aborts, pause, sleep
    "vllm_otel.mitigate.strategies.restart",       # restart backends: same or changed arguments
    "vllm_otel.mitigate.strategies.external",      # external HTTP hooks: load balancer, autoscaler
)

for _mod in _BUILTIN_MODULES:
    importlib.import_module(_mod)
