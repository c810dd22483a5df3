"""Plugins: collectors, predictors, exporters and mitigation strategies, from entry points
(``vllm_otel.plugins``) and a directory, hot-reloaded. See :class:`PluginManager`."""

from vllm_otel.plugins.base import PLUGIN_TYPES, PluginError, PluginInterface
from vllm_otel.plugins.manager import ENTRY_POINT_GROUP, LoadedPlugin, PluginManager

__all__ = ["PluginInterface", "PluginManager", "PluginError", "LoadedPlugin", "PLUGIN_TYPES",
           "ENTRY_POINT_GROUP", "create_plugin"]


def create_plugin(directory: str, name: str, plugin_type: str, execute_code: str, **kw: object) -> str:
    """Write a plugin file into ``directory`` (a running manager watching it loads it); its path."""
    from pathlib import Path

    from vllm_otel.plugins.create import write_plugin

    return str(write_plugin(Path(directory), name, plugin_type, execute_code, **kw))  # type: ignore[arg-type]
