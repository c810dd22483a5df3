"""``create_plugin``: write a plugin module from a method body, as the spec's API does.

The code is written to a file in the plugin directory, checked to compile first, and then loads
like any other plugin file (and is reloaded when edited). This is a local Python API for the
person running the service; no HTTP route reaches it.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Iterable

from vllm_otel.plugins.base import PLUGIN_TYPES, PluginError

__all__ = ["write_plugin", "render_plugin"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# The spec's "monitor" and "analyzer" kinds are collectors here.
_ALIASES = {"monitor": "collector", "analyzer": "collector"}


def render_plugin(name: str, plugin_type: str, execute_code: str, requires: Iterable[str] = ()) -> str:
    kind = _ALIASES.get(plugin_type, plugin_type)
    if not _NAME.match(name):
        raise PluginError(f"plugin name {name!r} must be snake_case (1-64 chars)")
    if kind not in PLUGIN_TYPES[:3]:
        raise PluginError(f"plugin_type {plugin_type!r} must be one of {', '.join(PLUGIN_TYPES[:3])} "
                          "(strategies are classes: write them as files)")
    body = textwrap.indent(textwrap.dedent(execute_code).strip("\n"), "    ")
    source = (f'"""Plugin {name}, written by create_plugin()."""\n\n'
              "from vllm_otel.plugins import PluginInterface\n\n\n"
              f"class {''.join(w.title() for w in name.split('_'))}Plugin(PluginInterface):\n"
              f"    name = {name!r}\n"
              f"    plugin_type = {kind!r}\n"
              f"    requires = {tuple(requires)!r}\n\n"
              f"{body}\n")
    try:
        compile(source, f"{name}.py", "exec")
    except SyntaxError as e:
        raise PluginError(f"plugin {name!r}: the code does not compile: {e.msg} (line {e.lineno})") from None
    if "def execute" not in body:
        raise PluginError(f"plugin {name!r}: execute_code must define execute(self)")
    return source


def write_plugin(directory: Path, name: str, plugin_type: str, execute_code: str, *,
                 requires: Iterable[str] = (), overwrite: bool = False) -> Path:
    source = render_plugin(name, plugin_type, execute_code, requires)
    path = directory / f"{name}.py"
    if path.exists() and not overwrite:
        raise PluginError(f"{path} exists; pass overwrite=True to replace it")
    tmp = directory / f".{name}.py.tmp"
    tmp.write_text(source)
    os.replace(tmp, path)  # atomic: the watcher never sees half a file
    return path
