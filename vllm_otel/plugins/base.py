"""What a plugin is: a :class:`PluginInterface` subclass in a module of the plugin directory (or
behind a ``vllm_otel.plugins`` entry point), or a mitigation strategy class (see the receiver)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping

__all__ = ["PluginInterface", "PluginError", "PLUGIN_TYPES", "check_plugin_class"]

# collector / predictor: execute() returns {name: number}, published as metrics.
# exporter: execute() sends what it exports; its return value is ignored.
# strategy: a mitigation strategy class, joining the receiver's catalog (not a PluginInterface).
PLUGIN_TYPES = ("collector", "predictor", "exporter", "strategy")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class PluginError(ValueError):
    """A plugin could not be loaded, ordered or created; the message names the plugin."""


class PluginInterface:
    """Subclass, set ``name`` (snake_case) and ``plugin_type``, implement :meth:`execute`.

    ``requires`` names plugins that must load first (their instances are passed to
    :meth:`initialize` in ``config["plugins"]``). Every method runs under the manager's guard: an
    exception is counted against the plugin and never reaches the service.
    """

    name: ClassVar[str]
    plugin_type: ClassVar[str] = "collector"
    requires: ClassVar[tuple[str, ...]] = ()

    def initialize(self, config: Mapping[str, Any]) -> None:
        """Called once after loading, with the plugin's settings and ``plugins`` (its requirements)."""

    def execute(self) -> Mapping[str, float] | None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Called before the plugin is unloaded or replaced by a new version of its file."""


def check_plugin_class(cls: type) -> list[str]:
    """What is wrong with ``cls`` as a plugin (empty: nothing)."""
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"name {name!r} must be snake_case (1-64 chars)")
    kind = getattr(cls, "plugin_type", None)
    if kind not in PLUGIN_TYPES[:3]:
        problems.append(f"plugin_type {kind!r} must be one of {', '.join(PLUGIN_TYPES[:3])}")
    req = getattr(cls, "requires", ())
    if not isinstance(req, (tuple, list)) or not all(isinstance(r, str) for r in req):
        problems.append("requires must be a tuple of plugin names")
    if cls.execute is PluginInterface.execute:
        problems.append("execute() is not implemented")
    return problems
