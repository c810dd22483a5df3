"""The ``vllm-otel`` command.

Subcommands are imported lazily: ``vllm-otel --help`` and the tools that do not need vLLM
(replay, backtest) work on a host without vLLM, and start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from vllm_otel import __version__

__all__ = ["main", "build_parser"]

# subcommand -> the module that registers it through add_parser(subparsers)
_SUBCOMMANDS = {
    "tiny-model": "vllm_otel.testing.cli",
    "replay": "vllm_otel.loadgen.cli",
    "backtest": "vllm_otel.forecast.cli",
    "forecaster": "vllm_otel.forecast.cli",
    "demo": "vllm_otel.demo",
    "receiver": "vllm_otel.mitigate.cli",
    "supervise": "vllm_otel.mitigate.supervisor.cli",
    "dashboards": "vllm_otel.dashboards.build",
    "check": "vllm_otel.prestartup_check",
    "status": "vllm_otel.status",
    "plugins": "vllm_otel.plugins.cli",
    "learner": "vllm_otel.learn.cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or with ``command`` only the module that registers it: each module's imports
    (numpy for replay, the test services for tiny-model) cost 0.1-0.2 s, and a
    receiver restarting after a crash should not pay for the others (Alertmanager retries meanwhile)."""
    parser = argparse.ArgumentParser(
        prog="vllm-otel",
        description="Observability, failure forecasting and guarded mitigation for vLLM.")
    parser.add_argument("--version", action="version", version=f"vllm-otel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [_SUBCOMMANDS[command]] if command in _SUBCOMMANDS else list(dict.fromkeys(_SUBCOMMANDS.values()))
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:  # a missing optional part must not break the other commands
            logging.getLogger("vllm_otel").debug("subcommands of %s unavailable: %s", mod_name, e)
            continue
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_in if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(args_in)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
