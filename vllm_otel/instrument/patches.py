"""Every change vllm-otel makes to vLLM's own classes and functions, with :func:`install` and
:func:`uninstall`, as OpenTelemetry's instrumentors have.

The general plugin calls ``install(api_server=...)`` in each vLLM process. Each patch is applied
at most once per process however often ``install`` runs, keeps vLLM's original as
``__wrapped__``, and :func:`uninstall` puts back exactly what was there (the same descriptor: a
``classmethod`` stays a ``classmethod``; an attribute we added is removed). A patch whose target
this vLLM lacks is skipped, the others still apply.

Every process (engine core and workers included):
- ``EngineCore.vllm_otel_control`` / ``WorkerBase.vllm_otel_gc``: methods the control endpoint
  calls through ``collective_rpc`` (cheap class attributes, used only when called);
- ``vllm.logger._configure_vllm_root_logger``: re-attaches the start-up phase handler after each
  of vLLM's logging (re)configurations (``dictConfig`` drops it; see :mod:`.phases`).

vLLM's main process (API server or the user's offline script):
- ``OutputProcessor.abort_requests``: counts requests aborted in the front end (client
  disconnects), which vLLM drops without passing them through its stats;
- ``LLMEngine.from_engine_args``: attaches our stat logger to engines built offline when
  monitoring is requested (vLLM loads stat-logger plugins only for async serving);
- ``vllm.LLM.get_monitoring_status``: the monitor's status on plain ``vllm.LLM``;
- ``EngineArgs.add_cli_args``: adds ``--enable-monitoring`` to vLLM's server arguments.
"""

from __future__ import annotations

import argparse
import os
import threading
from typing import Any, Callable

from vllm_otel.instrument.guard import guarded, logger

__all__ = ["install", "uninstall", "installed", "requested", "request_monitoring"]

_MISSING = object()
_lock = threading.Lock()
# (owner, attribute) -> what was there before (the raw class/module attribute, or _MISSING)
_originals: dict[tuple[Any, str], Any] = {}
_local = threading.local()
_TRUE = {"1", "true", "yes", "on"}


# ---- patching machinery --------------------------------------------------------------------------
def _raw(owner: Any, name: str) -> Any:
    return vars(owner).get(name, _MISSING)


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.name`` by ``make(original)``, keeping its descriptor kind; once only."""
    with _lock:
        if (owner, name) in _originals:
            return
        raw = _raw(owner, name)
        if raw is _MISSING:
            logger.info("vllm-otel: %s.%s not found in this vLLM; not patched",
                        getattr(owner, "__name__", owner), name)
            return
        kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
        func = raw.__func__ if kind else raw
        wrapper = make(func)
        wrapper.__wrapped__ = func  # type: ignore[attr-defined]
        setattr(owner, name, kind(wrapper) if kind else wrapper)
        _originals[(owner, name)] = raw


def _add(owner: Any, name: str, value: Any) -> None:
    """Give ``owner`` a new attribute ``name``; left alone when it already has one."""
    with _lock:
        if (owner, name) in _originals or hasattr(owner, name):
            return
        setattr(owner, name, value)
        _originals[(owner, name)] = _MISSING


def installed() -> list[str]:
    """``Owner.attribute`` of each patch in place, for diagnostics and tests."""
    with _lock:
        return [f"{getattr(o, '__name__', o)}.{n}" for o, n in _originals]


def install(api_server: bool = True) -> None:
    """Apply the patches this process needs (``api_server``: vLLM's main process). Idempotent."""
    _patch_control()
    _patch_logging_config()
    if api_server:
        _patch_abort_requests()
        _patch_from_engine_args()
        _patch_llm_status()
        _patch_cli_args()


def uninstall() -> None:
    """Put back everything :func:`install` changed, in reverse order."""
    with _lock:
        items = list(_originals.items())[::-1]
        _originals.clear()
    for (owner, name), raw in items:
        try:
            if raw is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, raw)
        except Exception:  # noqa: BLE001 - the rest must still be restored
            logger.warning("vllm-otel: could not restore %s.%s", owner, name, exc_info=True)


# ---- every process -----------------------------------------------------------------------------
@guarded("patches.control")
def _patch_control() -> None:
    from vllm_otel.instrument.control import _engine_control, _worker_gc

    try:
        from vllm.v1.engine.core import EngineCore

        _add(EngineCore, "vllm_otel_control", _engine_control)
    except ImportError:
        pass
    try:
        from vllm.v1.worker.worker_base import WorkerBase

        _add(WorkerBase, "vllm_otel_gc", _worker_gc)
    except ImportError:
        pass


@guarded("patches.logging_config")
def _patch_logging_config() -> None:
    try:
        import vllm.logger as vllm_logging
    except ImportError:  # no vLLM (tests, offline tools): nothing reconfigures
        return

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def _configure_vllm_root_logger(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            try:
                from vllm_otel.instrument.phases import attach_handlers

                attach_handlers()
            except Exception:  # noqa: BLE001
                logger.debug("vllm-otel: phase handler not re-attached", exc_info=True)
            return result

        return _configure_vllm_root_logger

    _wrap(vllm_logging, "_configure_vllm_root_logger", make)


# ---- vLLM's main process -----------------------------------------------------------------------
@guarded("patches.abort_requests")
def _patch_abort_requests() -> None:
    """Count requests aborted in the front end (client disconnects).

    ``vllm:request_success_total{finished_reason="abort"}`` misses them: vLLM drops them without
    passing them through its stats. Our part is guarded, vLLM's result is returned unchanged.
    """
    from vllm.v1.engine.output_processor import OutputProcessor

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def abort_requests(self, request_ids, internal, *args, **kwargs):  # noqa: ANN001, ANN202
            external: list[str] = []
            # A one-shot iterable must reach vLLM whole: read it once, hand vLLM the list.
            request_ids = list(request_ids)
            try:
                states = self.request_states
                for rid in request_ids:
                    st = states.get(rid) if internal else None
                    if st is not None:
                        external.append(st.external_req_id)
                    elif not internal and rid in self.external_req_ids:
                        external.append(rid)
            except Exception:  # noqa: BLE001
                external = []
            result = original(self, request_ids, internal, *args, **kwargs)
            if external:
                _report_aborts(external)
            return result

        return abort_requests

    _wrap(OutputProcessor, "abort_requests", make)


@guarded("plugin.report_aborts")
def _report_aborts(external_ids: list[str]) -> None:
    from vllm_otel.instrument.monitor import get_monitor

    mon = get_monitor()
    if mon is not None:
        mon.on_client_abort(external_ids)


def requested() -> bool:
    """Offline monitoring asked for: ``VLLM_ENABLE_MONITORING`` or :class:`request_monitoring`."""
    return bool(getattr(_local, "on", False)) or \
        os.environ.get("VLLM_ENABLE_MONITORING", "").strip().lower() in _TRUE


class request_monitoring:  # noqa: N801 - used as a context manager, reads like a statement
    """Within this block, engines built by ``LLMEngine.from_engine_args`` are monitored."""

    def __enter__(self) -> None:
        self._prev = getattr(_local, "on", False)
        _local.on = True

    def __exit__(self, *exc: object) -> None:
        _local.on = self._prev


@guarded("offline.mark_ready")
def _mark_ready() -> None:
    # No HTTP server offline: the engine can take requests once LLMEngine is built.
    from vllm_otel.instrument.monitor import get_monitor

    if (mon := get_monitor()) is not None:
        mon.ready("LLMEngine built (offline)")


@guarded("patches.from_engine_args")
def _patch_from_engine_args() -> None:
    from vllm.v1.engine.llm_engine import LLMEngine

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
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

        return from_engine_args

    _wrap(LLMEngine, "from_engine_args", make)


def monitoring_status(self: Any = None) -> dict[str, Any]:
    """``llm.get_monitoring_status()``: the monitor's status, or a note why there is none."""
    from vllm_otel.instrument.monitor import get_monitor

    mon = get_monitor()
    if mon is None:
        return {"enabled": False, "active_requests": 0,
                "note": "monitoring not enabled: set VLLM_ENABLE_MONITORING=true or use "
                        "vllm_otel.LLM(..., enable_monitoring=True)"}
    return {"enabled": True, **mon.get_engine_status()}


@guarded("patches.llm_status")
def _patch_llm_status() -> None:
    from vllm import LLM

    _add(LLM, "get_monitoring_status", monitoring_status)


class _EnableMonitoring(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=None,
                         help="vllm-otel: enable monitoring (same as VLLM_ENABLE_MONITORING=true)")

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        # Set before vLLM spawns its engine core, so every process sees it.
        os.environ["VLLM_ENABLE_MONITORING"] = "true"
        setattr(namespace, self.dest, True)


@guarded("patches.cli_args")
def _patch_cli_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def add_cli_args(parser, *args, **kwargs):  # noqa: ANN001, ANN202
            parser = original(parser, *args, **kwargs)
            try:
                parser.add_argument("--enable-monitoring", action=_EnableMonitoring)
            except (argparse.ArgumentError, ValueError):
                pass  # already there (parser built twice)
            return parser

        return add_cli_args

    _wrap(EngineArgs, "add_cli_args", make)
