"""Lifecycle signals read from vLLM's own log records, in the process that logs them.

vLLM announces each start-up phase, its shutdown and its engine's death with a log record
(format strings below, vLLM 0.32). The general plugin runs in every vLLM process (API server,
engine core, worker) and installs :class:`PhaseHandler` on the loggers of the modules that log
them, so a phase is seen in the process that enters it, at the record's own time
(``record.created``).

The monitor lives in the API server, but model and KV-cache phases happen in the engine core
and its worker. The API server therefore makes a private directory (``mkdtemp``, mode 0700) and
names it in ``VLLM_OTEL_LIFECYCLE_DIR``, which the processes it starts inherit; each of them
appends its phases there as JSON lines (``<pid>.jsonl``), and the monitor reads them when it
builds an engine's tracker, after vLLM's start-up handshake. The owner removes the directory at
exit. Nothing is claimed that no record announced: with vLLM's log level above INFO (or
``VLLM_CONFIGURE_LOGGING=0``) the phases are simply not seen.

Everything here is guarded: a failure is logged once and the phase is lost, vLLM is unaffected.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vllm_otel.instrument.lifecycle import LifecycleState as S

__all__ = ["PHASE_LOGGERS", "PHASE_RECORDS", "Phase", "PhaseHandler", "install", "collect", "subscribe",
           "process_start_time", "attach_handlers", "ENV_DIR", "ENV_OWNER"]

logger = logging.getLogger(__name__)
ENV_DIR = "VLLM_OTEL_LIFECYCLE_DIR"
ENV_OWNER = "VLLM_OTEL_LIFECYCLE_OWNER"

# (start of vLLM's format string, state it announces, what it means). vLLM 0.32's messages.
PHASE_RECORDS: tuple[tuple[str, S, str], ...] = (
    ("non-default args:", S.CONFIGURING, "api server: arguments parsed, engine config next"),
    ("world_size=%d rank=%d local_rank=%d distributed_init_method", S.DISTRIBUTED_INIT,
     "worker: torch.distributed initialised"),
    ("Starting to load model", S.MODEL_LOADING, "worker: model runner starts loading"),
    ("Initializing model took", S.WEIGHTS_LOADING, "worker: model built, weights next"),
    # vLLM's "init engine (profile, create kv cache, warmup model)" phase starts here.
    ("Loading weights took", S.KV_CACHE_ALLOCATION, "worker: weights loaded"),
    ("Starting vLLM server on", S.READY, "api server: HTTP server starts listening"),
    ("[shutdown] API server: shutdown triggered", S.SHUTTING_DOWN, "api server: shutdown"),
    ("[shutdown] MPClient: engine core exited unexpectedly", S.CRASHED,
     "api server: its engine core process died"),
)
# The modules whose loggers log them. The handler sits on these, not on the "vllm" logger: vLLM
# re-applies its dictConfig after parsing its arguments, which drops the "vllm" logger's
# handlers but leaves its children's.
PHASE_LOGGERS: tuple[str, ...] = (
    "vllm.entrypoints.serve.utils.api_utils", "vllm.entrypoints.launchers.api_server.entry",
    "vllm.entrypoints.launchers.launcher", "vllm.v1.engine.core_client",
    "vllm.distributed.parallel_state", "vllm.v1.worker.cpu_model_runner",
    "vllm.v1.worker.gpu_model_runner", "vllm.model_executor.model_loader.base_loader",
    "vllm.model_executor.model_loader.default_loader",
    "vllm.model_executor.model_loader.sharded_state_loader",
)


@dataclass(frozen=True)
class Phase:
    state: S
    at: float
    reason: str
    pid: int

    def to_json(self) -> str:
        return json.dumps({"state": self.state.value, "at": self.at, "reason": self.reason,
                           "pid": self.pid})


Listener = Callable[[Phase], None]
_lock = threading.Lock()
_seen: list[Phase] = []
_listeners: list[Listener] = []
_installed_pid: int | None = None
_out: Path | None = None  # where a child process appends its phases


def process_start_time(pid: int | None = None) -> float | None:
    """Unix time the process started (the kernel's record), None when unknown."""
    try:
        import psutil

        return float(psutil.Process(pid or os.getpid()).create_time())
    except Exception:  # noqa: BLE001 - psutil missing or the process gone
        return None


def _match(template: object) -> S | None:
    if not isinstance(template, str):
        return None
    for prefix, state, _ in PHASE_RECORDS:
        if template.startswith(prefix):
            return state
    return None


class PhaseHandler(logging.Handler):
    """Turns vLLM's phase records into :class:`Phase` entries; costs one prefix test per record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            state = _match(record.msg)
            if state is None:
                return
            from vllm_otel.redact import redact_text

            phase = Phase(state, float(record.created), redact_text(record.getMessage()[:200]),
                          os.getpid())
            _publish(phase)
        except Exception:  # noqa: BLE001 - a logging handler must never raise into vLLM
            logger.debug("vllm-otel: phase record lost", exc_info=True)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def _publish(phase: Phase) -> None:
    with _lock:
        _seen.append(phase)
        listeners = tuple(_listeners)
        out = _out
    if out is not None:
        with open(out, "a", encoding="utf-8") as f:  # one short line: appends do not interleave
            f.write(phase.to_json() + "\n")
    for listener in listeners:
        try:
            listener(phase)
        except Exception:  # noqa: BLE001
            logger.debug("vllm-otel: phase listener failed", exc_info=True)


def _is_ancestor(pid: int) -> bool:
    try:
        import psutil

        return any(p.pid == pid for p in psutil.Process().parents())
    except Exception:  # noqa: BLE001
        return False


def install() -> None:
    """Install the handler in this process (once per pid).

    A multiprocessing child whose ancestor made a directory (the API server that started this
    engine core or worker) writes its phases there; any other process (vLLM's main process)
    makes its own for its children. A vLLM started by another instrumented process therefore
    never writes into that one's directory.
    """
    global _installed_pid, _out
    with _lock:
        if _installed_pid == os.getpid():
            return
        _installed_pid = os.getpid()
        _seen.clear()  # a forked child starts its own list
        _out = None
    d, own = os.environ.get(ENV_DIR), os.environ.get(ENV_OWNER)
    # vLLM starts its engine cores and workers with multiprocessing; its main process (the API
    # server, an offline script) is never a multiprocessing child, even when something that ran
    # this plugin started it.
    child = multiprocessing.parent_process() is not None
    if child and d and own and own.isdigit() and _is_ancestor(int(own)) and Path(d).is_dir():
        with _lock:
            _out = Path(d) / f"{os.getpid()}.jsonl"
    else:
        d = tempfile.mkdtemp(prefix="vllm-otel-lifecycle-")
        os.environ[ENV_DIR], os.environ[ENV_OWNER] = d, str(os.getpid())
        atexit.register(shutil.rmtree, d, True)
    attach_handlers()


def attach_handlers() -> None:
    """Put the handler on each of :data:`PHASE_LOGGERS` (again after vLLM's ``dictConfig``
    dropped it: :mod:`.patches` re-attaches after each of vLLM's logging configurations)."""
    handler = PhaseHandler(level=logging.INFO)
    for name in PHASE_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(h, PhaseHandler) for h in log.handlers):
            log.addHandler(handler)


def collect(children: bool = True) -> list[Phase]:
    """This process's phases, and (``children``) those its child processes wrote, by time."""
    with _lock:
        out = list(_seen)
    d, own = os.environ.get(ENV_DIR), os.environ.get(ENV_OWNER)
    if children and d and own == str(os.getpid()):
        for path in sorted(Path(d).glob("*.jsonl")):
            try:
                for line in path.read_text(encoding="utf-8").splitlines():
                    doc = json.loads(line)
                    out.append(Phase(S(doc["state"]), float(doc["at"]), str(doc["reason"])[:200],
                                     int(doc["pid"])))
            except Exception:  # noqa: BLE001 - a torn or foreign line: skip the file
                logger.warning("vllm-otel: unreadable lifecycle record file %s", path.name)
    return sorted(out, key=lambda p: p.at)


def subscribe(listener: Listener) -> None:
    """Call ``listener(phase)`` for each phase this process sees from now on."""
    with _lock:
        _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)
