"""Start-up phases from vLLM's log records across processes (vllm_otel.instrument.phases): a real
child process logs vLLM's own format string and the parent reads it back, at the record's time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from vllm_otel.instrument import phases
from vllm_otel.instrument.lifecycle import LifecycleState as S

CHILD = """
import logging, time
from vllm_otel.instrument import phases
phases.install()
log = logging.getLogger("vllm.v1.worker.cpu_model_runner")
log.setLevel(logging.INFO)
log.info("Starting to load model %s...", "/models/tiny")
log.info("an unrelated record")
print(time.time())
"""


def _child(env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_a_child_hands_its_phase_to_the_process_that_started_it() -> None:
    phases.install()
    assert os.environ[phases.ENV_OWNER] == str(os.getpid())
    t0 = time.time()
    t_end = _child({**os.environ, "PYTHONPATH": os.getcwd()})
    got = [p for p in phases.collect() if p.pid != os.getpid()]
    assert [p.state for p in got] == [S.MODEL_LOADING], got
    assert t0 < got[0].at <= t_end and got[0].reason == "Starting to load model /models/tiny..."


def test_a_foreign_directory_is_never_written() -> None:
    phases.install()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:  # a directory owned by a process that is not the child's ancestor
        before = sorted(os.listdir(os.environ[phases.ENV_DIR]))
        _child({**os.environ, "PYTHONPATH": os.getcwd(), phases.ENV_OWNER: str(sleeper.pid)})
        assert sorted(os.listdir(os.environ[phases.ENV_DIR])) == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_handler_survives_vllms_logging_reconfiguration() -> None:
    """vLLM re-applies its dictConfig after parsing arguments; that clears handlers of every
    logger under "vllm". The phase handler must still see the next record."""
    import logging

    import pytest

    vl = pytest.importorskip("vllm.logger")
    phases.install()
    from vllm.config.logging import LoggingConfig

    vl.configure_logging(LoggingConfig())
    log = logging.getLogger("vllm.entrypoints.launchers.api_server.entry")
    before = len(phases.collect(children=False))
    log.info("Starting vLLM server on %s", "http://127.0.0.1:1")
    got = phases.collect(children=False)
    assert len(got) == before + 1 and got[-1].state is S.READY
