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

# module -> the subcommands it registers through add_parser(subparsers)
_SUBCOMMAND_MODULES = (
    "vllm_otel.testing.cli",      # tiny-model
    "vllm_otel.loadgen.cli",      # replay
    "vllm_otel.forecast.cli",     # backtest
    "vllm_otel.demo",             # demo
    "vllm_otel.mitigate.cli",     # receiver
    "vllm_otel.mitigate.supervise_cli",  # supervise
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-otel",
        description="Observability, failure forecasting and guarded mitigation for vLLM.")
    parser.add_argument("--version", action="version", version=f"vllm-otel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:  # a missing optional part must not break the other commands
            logging.getLogger("vllm_otel").debug("subcommands of %s unavailable: %s", mod_name, e)
            continue
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
