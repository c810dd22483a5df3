"""``vllm-otel plugins check``: load a plugin directory as the receiver would, run each plugin once,
and report (exit 2 when any failed to load or run)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="check the plugins of a directory (load and run each once)",
                       description="Load every plugin file of the directory (and installed "
                                   "vllm_otel.plugins entry points) in dependency order, run each once, "
                                   "and print what loaded, what failed and why.")
    p.add_argument("action", choices=["check"])
    p.add_argument("--dir", help="plugin directory (default: plugin_directory of the configuration)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_otel.config import ConfigError, load_config
    from vllm_otel.mitigate.plugin_hooks import make_plugin_manager
    from vllm_otel.plugins import PluginError

    try:
        directory = load_config(overrides={"plugin_directory": args.dir}).plugin_directory
        if not directory:
            print("vllm-otel plugins: no directory (--dir or plugin_directory)", file=sys.stderr)
            return 2
        manager = make_plugin_manager(directory, {})
    except (ConfigError, PluginError) as e:
        print(f"vllm-otel plugins: {e}", file=sys.stderr)
        return 2
    manager.load_all()
    manager.run_once()
    rows = manager.status()
    manager.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            extra = r["last_error"] or ", ".join(f"{k}={v:g}" for k, v in r["last_result"].items())
            print(f"{r['state']:9} {r['type']:10} {r['name']:24} {extra}")
    return 2 if any(r["state"] != "active" or r["last_error"] for r in rows) else 0
