"""Start-up phases from vLLM's log records across processes (vllm_otel.instrument.phases): a real
child process logs vLLM's own format string and the parent reads it back, at the record's time."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

from vllm_otel.instrument import phases
from vllm_otel.instrument.lifecycle import LifecycleState as S

def _log_a_phase(q: "multiprocessing.Queue[float]") -> None:
    import logging

    phases.install()
    log = logging.getLogger("vllm.v1.worker.cpu_model_runner")
    log.setLevel(logging.INFO)
    log.info("Starting to load model %s...", "/models/tiny")
    log.info("an unrelated record")
    q.put(time.time())


def _child(env: dict[str, str]) -> float:
    """A spawned multiprocessing child, as vLLM starts its engine core and workers."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        p = ctx.Process(target=_log_a_phase, args=(q,))
        p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    t = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    return t


def test_a_child_hands_its_phase_to_the_process_that_started_it() -> None:
    phases.install()
    assert os.environ[phases.ENV_OWNER] == str(os.getpid())
    t0 = time.time()
    t_end = _child({"PYTHONPATH": os.getcwd()})
    got = [p for p in phases.collect() if p.pid != os.getpid()]
    assert [p.state for p in got] == [S.MODEL_LOADING], got
    assert t0 < got[0].at <= t_end and got[0].reason == "Starting to load model /models/tiny..."


def test_a_foreign_directory_is_never_written() -> None:
    phases.install()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:  # a directory owned by a process that is not the child's ancestor
        before = sorted(os.listdir(os.environ[phases.ENV_DIR]))
        _child({"PYTHONPATH": os.getcwd(), phases.ENV_OWNER: str(sleeper.pid)})
        assert sorted(os.listdir(os.environ[phases.ENV_DIR])) == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_process_started_by_an_owner_is_its_own_owner() -> None:
    """vLLM's main process started by an instrumented process (a subprocess, not a
    multiprocessing child) keeps its own directory for its own engine core."""
    phases.install()
    code = ("import os; from vllm_otel.instrument import phases; phases.install(); "
            "print(os.environ[phases.ENV_OWNER] == str(os.getpid()))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()},
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"


def test_the_handler_survives_vllms_logging_reconfiguration() -> None:
    """vLLM re-applies its dictConfig after parsing arguments; that clears handlers of every
    logger under "vllm". The phase handler must still see the next record."""
    import logging

    import pytest

    vl = pytest.importorskip("vllm.logger")
    from vllm_otel.instrument import patches

    phases.install()
    patches.install(api_server=False)  # as the general plugin does in every process
    from vllm.config.logging import LoggingConfig

    try:
        vl.configure_logging(LoggingConfig())
        log = logging.getLogger("vllm.entrypoints.launchers.api_server.entry")
        before = len(phases.collect(children=False))
        log.info("Starting vLLM server on %s", "http://127.0.0.1:1")
        got = phases.collect(children=False)
    finally:
        patches.uninstall()
    assert len(got) == before + 1 and got[-1].state is S.READY
