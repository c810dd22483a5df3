"""The ``vllm.general_plugins`` entry point.

vLLM runs general plugins in *every* process it starts (API server, engine core, each worker), may
run them more than once per process, and does not catch their exceptions. So :func:`register` is
idempotent per process, does nothing unless monitoring is enabled, and is wrapped in
:func:`~vllm_otel.instrument.guard.guarded`.

Which group loads where (vLLM 0.32, ``vllm/plugins/__init__.py``):
- ``vllm.general_plugins``: every process; allow-listed by ``VLLM_PLUGINS`` when that is set.
- ``vllm.stat_logger_plugins``: the API-server process, async serving only.
- ``vllm.endpoint_plugins``: the API server, and only when named in ``VLLM_PLUGINS``.
All three of ours are named ``vllm_otel``, so ``VLLM_PLUGINS=vllm_otel`` enables the set.
"""

from __future__ import annotations

import os
import threading

from vllm_otel.instrument.guard import guarded, logger

__all__ = ["register", "is_registered", "process_role"]

_lock = threading.Lock()
_CHECKED_ENV = "VLLM_OTEL_PRESTARTUP_CHECKED"
_registered_pid: int | None = None


def process_role() -> str:
    """Best guess of which vLLM process we are in, from the title vLLM gives its processes."""
    try:
        import setproctitle  # vLLM depends on it and uses it to name its processes

        title = setproctitle.getproctitle()
    except Exception:  # noqa: BLE001
        title = ""
    if "EngineCore" in title:
        return "engine_core"
    if "Worker" in title:
        return "worker"
    return "api_server"


def is_registered() -> bool:
    return _registered_pid == os.getpid()


@guarded("general_plugin.register")
def register() -> None:
    """Entry point called by vLLM in each process. Safe to call any number of times."""
    global _registered_pid
    with _lock:
        # Per-pid, not a plain flag: a forked child inherits module state but is a new process.
        if _registered_pid == os.getpid():
            return
        _registered_pid = os.getpid()
    from vllm_otel.config import ConfigError, load_config

    try:
        cfg = load_config()
    except ConfigError as e:
        logger.warning("vllm-otel: %s; monitoring disabled in this process", e)
        return
    if not cfg.enabled:
        logger.debug("vllm-otel: monitoring disabled (VLLM_ENABLE_MONITORING)")
        return
    logger.setLevel(cfg.log_level)
    role = process_role()
    if cfg.prestartup_check and role == "api_server":
        _prestartup_check()
    logger.info("vllm-otel plugin registered in pid %d (%s)", os.getpid(), role)
    # Start-up phases are logged by the process that goes through them: watch in every process.
    try:
        from vllm_otel.instrument.phases import install as install_phases

        install_phases()
    except Exception:  # noqa: BLE001 - the rest of the plugin still works without phases
        logger.warning("vllm-otel: start-up phases not watched in pid %d", os.getpid(), exc_info=True)
    # Control methods on EngineCore / workers: cheap class attributes, used only when called.
    from vllm_otel.instrument.control import install_engine_side

    install_engine_side()
    if role == "api_server":  # vLLM's main process: API server or the user's offline script
        _install_abort_hook()
        from vllm_otel.instrument.offline import install as install_offline

        install_offline()


def _prestartup_check() -> None:
    """VLLM_MONITOR_PRESTARTUP_CHECK: check vLLM's command line before it starts.

    vLLM loads general plugins while it builds its argument parser, before it binds the port or
    loads the model, so this is early enough to refuse. Errors stop vLLM with exit status 2 and the
    report in the log (the one deliberate exit: SystemExit passes :func:`guarded`); a failure of
    the check itself is only logged, vLLM starts.
    """
    import sys

    # Once per launch: the engine core and workers inherit this from the process that checked
    # (their titles may not be set yet when vLLM loads plugins there, and the port is theirs by then).
    if os.environ.get(_CHECKED_ENV):
        return
    os.environ[_CHECKED_ENV] = str(os.getpid())
    try:
        from vllm_otel.prestartup_check import check_before_start

        argv = list(sys.argv)
        # The offline API (LLM(...) in a user's script) serves nothing: no port to check.
        serving = "serve" in argv[1:2] or argv[0].endswith(("api_server.py", "api_server"))
        ok = check_before_start(argv[1:] if serving else [], "vllm-otel", check_port=serving)
    except Exception:  # noqa: BLE001 - a broken check must not stop vLLM
        logger.warning("vllm-otel: pre-startup check failed to run; vLLM starts anyway", exc_info=True)
        return
    if not ok:
        logger.error("vllm-otel: refusing to start vLLM: the pre-startup check found errors "
                     "(VLLM_MONITOR_PRESTARTUP_CHECK=true; run `vllm-otel check` for the report)")
        raise SystemExit(2)


def _install_abort_hook() -> None:
    """Count requests aborted in the front end (client disconnects).

    vLLM's ``OutputProcessor.abort_requests`` drops such requests without passing them through
    its stats, so ``vllm:request_success_total{finished_reason="abort"}`` misses them. We wrap the
    method (once per process) and report the aborted ids to the monitor after vLLM is done; our
    part is guarded, vLLM's result is returned unchanged.
    """
    try:
        from vllm.v1.engine.output_processor import OutputProcessor
    except Exception:  # noqa: BLE001 - another vLLM layout: skip, the rest still works
        logger.info("vllm-otel: OutputProcessor not found; client aborts not counted")
        return
    original = OutputProcessor.abort_requests
    if getattr(original, "_vllm_otel_wrapped", False):
        return

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

    abort_requests._vllm_otel_wrapped = True  # type: ignore[attr-defined]
    abort_requests.__wrapped__ = original  # type: ignore[attr-defined]
    OutputProcessor.abort_requests = abort_requests


@guarded("plugin.report_aborts")
def _report_aborts(external_ids: list[str]) -> None:
    from vllm_otel.instrument.monitor import get_monitor

    mon = get_monitor()
    if mon is not None:
        mon.on_client_abort(external_ids)
