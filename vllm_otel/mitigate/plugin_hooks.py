"""The receiver's side of plugins: strategy plugins join the strategy registry (the catalog the
policy and the learner choose from) through ``register_strategy``; collector results are published
on the receiver's ``/metrics``."""

from __future__ import annotations

import logging
from typing import Any

from vllm_otel.mitigate.strategies import REGISTRY, Strategy, register_strategy
from vllm_otel.plugins import PluginManager

__all__ = ["make_plugin_manager"]

log = logging.getLogger(__name__)


def make_plugin_manager(directory: str | None, holder: dict[str, Any]) -> PluginManager:
    """A manager whose strategy plugins go into :data:`REGISTRY`; ``holder["policy"]``, once set,
    is rebound when a strategy it uses is reloaded. Built-in strategies cannot be replaced."""
    builtin = set(REGISTRY.names())

    def on_strategy(name: str, cls: type | None) -> None:
        if name in builtin:
            raise ValueError(f"{name!r} is a built-in strategy; give the plugin another name")
        previous = REGISTRY.unregister(name)
        if cls is None:
            log.warning("vllm-otel plugins: strategy %s removed from the catalog", name)
            return
        try:
            register_strategy(name, cls)
            policy = holder.get("policy")
            if policy is not None:
                policy.rebind(name)
        except Exception:
            REGISTRY.unregister(name)
            if previous is not None:
                REGISTRY.register(previous)
                if holder.get("policy") is not None:
                    holder["policy"].rebind(name)
            raise

    return PluginManager(directory, strategy_base=Strategy, on_strategy=on_strategy)
