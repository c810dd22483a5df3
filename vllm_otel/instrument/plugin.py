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
    from vllm_otel.instrument import patches

    # vLLM's main process (API server or the user's offline script) gets the front-end patches.
    patches.install(api_server=role == "api_server")


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
