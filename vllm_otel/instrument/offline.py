"""Monitoring for offline use (``vllm.LLM`` / ``LLMEngine``) and the ``--enable-monitoring`` flag.

vLLM loads stat-logger plugins only for async serving, and ``LLM`` turns stats off by default.
Offline monitoring therefore attaches our stat logger when the engine is built:
- :func:`install` (called by the general plugin in vLLM's main process) wraps
  ``LLMEngine.from_engine_args``: when monitoring is requested (``VLLM_ENABLE_MONITORING=true``
  set explicitly, or :class:`vllm_otel.LLM` with ``enable_monitoring=True``) it turns stats on and
  adds :class:`~vllm_otel.instrument.stat_logger.OtelStatLogger`; it also gives ``vllm.LLM`` a
  ``get_monitoring_status()`` method;
- it adds ``--enable-monitoring`` to vLLM's server argument parser (general plugins are loaded
  right before vLLM adds its engine arguments), which sets ``VLLM_ENABLE_MONITORING=true``.
"""

from __future__ import annotations

import argparse
import os
import threading
from typing import Any

from vllm_otel.instrument.guard import guarded, logger

__all__ = ["install", "requested", "request_monitoring"]

_local = threading.local()
_TRUE = {"1", "true", "yes", "on"}


def requested() -> bool:
    return bool(getattr(_local, "on", False)) or \
        os.environ.get("VLLM_ENABLE_MONITORING", "").strip().lower() in _TRUE


class request_monitoring:  # noqa: N801 - used as a context manager, reads like a statement
    """Within this block, engines built by ``LLMEngine.from_engine_args`` are monitored."""

    def __enter__(self) -> None:
        self._prev = getattr(_local, "on", False)
        _local.on = True

    def __exit__(self, *exc: object) -> None:
        _local.on = self._prev


class _EnableMonitoring(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=None,
                         help="vllm-otel: enable monitoring (same as VLLM_ENABLE_MONITORING=true)")

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        # Set before vLLM spawns its engine core, so every process sees it.
        os.environ["VLLM_ENABLE_MONITORING"] = "true"
        setattr(namespace, self.dest, True)


def _monitoring_status(self: Any) -> dict[str, Any]:
    """``llm.get_monitoring_status()``: the monitor's status, or a note why there is none."""
    from vllm_otel.instrument.monitor import get_monitor

    mon = get_monitor()
    if mon is None:
        return {"enabled": False, "active_requests": 0,
                "note": "monitoring not enabled: set VLLM_ENABLE_MONITORING=true or use "
                        "vllm_otel.LLM(..., enable_monitoring=True)"}
    return {"enabled": True, **mon.get_engine_status()}


@guarded("offline.mark_ready")
def _mark_ready() -> None:
    # No HTTP server offline: the engine can take requests once LLMEngine is built.
    from vllm_otel.instrument.monitor import get_monitor

    if (mon := get_monitor()) is not None:
        mon.ready("LLMEngine built (offline)")


@guarded("offline.install")
def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    if not getattr(LLMEngine.from_engine_args, "_vllm_otel_wrapped", False):
        original = LLMEngine.from_engine_args.__func__

        def from_engine_args(cls, engine_args, *args, **kwargs):  # noqa: ANN001, ANN202
            try:
                if requested():
                    from vllm_otel.instrument.stat_logger import OtelStatLogger

                    engine_args.disable_log_stats = False
                    loggers = list(kwargs.get("stat_loggers") or [])
                    if OtelStatLogger not in loggers:
                        loggers.append(OtelStatLogger)
                    kwargs["stat_loggers"] = loggers
            except Exception:  # noqa: BLE001 - fall back to the unmonitored engine
                logger.warning("vllm-otel: could not attach offline monitoring", exc_info=True)
            engine = original(cls, engine_args, *args, **kwargs)
            _mark_ready()
            return engine

        from_engine_args._vllm_otel_wrapped = True  # type: ignore[attr-defined]
        LLMEngine.from_engine_args = classmethod(from_engine_args)

    try:
        from vllm import LLM

        if not hasattr(LLM, "get_monitoring_status"):
            LLM.get_monitoring_status = _monitoring_status
    except Exception:  # noqa: BLE001
        pass

    if not getattr(EngineArgs.add_cli_args, "_vllm_otel_wrapped", False):
        original_add = EngineArgs.add_cli_args

        def add_cli_args(parser, *args, **kwargs):  # noqa: ANN001, ANN202
            parser = original_add(parser, *args, **kwargs)
            try:
                parser.add_argument("--enable-monitoring", action=_EnableMonitoring)
            except (argparse.ArgumentError, ValueError):
                pass  # already there (parser built twice)
            return parser

        add_cli_args._vllm_otel_wrapped = True  # type: ignore[attr-defined]
        EngineArgs.add_cli_args = staticmethod(add_cli_args)
