"""Tests for vllm_otel.instrument.host, against real processes (this one, real children) and the
real /proc, /dev/shm and psutil: nothing is faked except, where said, the pids provider."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import psutil
import pytest
from prometheus_client import CollectorRegistry

from vllm_otel.instrument.host import ProcessCollector, default_pids_provider, role_from_title

LOGGER = "vllm_otel.instrument.host"
I = {"instance": "h:8000"}


def proc_labels(role: str, pid: int, tp: str = "") -> dict:
    return {**I, "role": role, "pid": str(pid), "dp_rank": "", "pp_rank": "", "tp_rank": tp}


@pytest.fixture
def sleeper():
    child = subprocess.Popen(["sleep", "30"])
    yield child
    child.kill()
    child.wait()


def test_current_process_with_default_provider():
    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg)
    me = proc_labels("api_server", os.getpid())
    v = reg.get_sample_value
    rss = v("vllm_otel_process_resident_memory_bytes", me)
    assert rss is not None and rss > 1e6
    assert v("vllm_otel_process_virtual_memory_bytes", me) >= rss
    assert v("vllm_otel_process_cpu_seconds_total", me) > 0
    assert v("vllm_otel_process_open_fds", me) >= 3
    assert v("vllm_otel_process_threads", me) >= 1
    assert v("vllm_otel_process_count", {**I, "role": "api_server"}) == 1


def test_real_child_mapped_by_provider(sleeper):
    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg,
                     pids_provider=lambda: {"api_server": [os.getpid()], "worker": [sleeper.pid]})
    worker = proc_labels("worker", sleeper.pid)
    v = reg.get_sample_value
    assert v("vllm_otel_process_resident_memory_bytes", worker) > 0
    assert v("vllm_otel_process_threads", worker) == 1
    assert v("vllm_otel_process_cpu_seconds_total", worker) >= 0
    assert v("vllm_otel_process_count", {**I, "role": "worker"}) == 1
    assert v("vllm_otel_process_count", {**I, "role": "api_server"}) == 1


def test_vanished_pid_is_skipped_silently(caplog, sleeper):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer exists
    assert not psutil.pid_exists(gone.pid)
    reg = CollectorRegistry()
    col = ProcessCollector("h:8000", registry=reg,
                           pids_provider=lambda: {"worker": [gone.pid, sleeper.pid]})
    samples = [s for m in reg.collect() for s in m.samples]
    assert not [s for s in samples if s.labels.get("pid") == str(gone.pid)]
    assert reg.get_sample_value("vllm_otel_process_threads", proc_labels("worker", sleeper.pid)) == 1
    assert reg.get_sample_value("vllm_otel_process_count", {**I, "role": "worker"}) == 1
    assert [p["pid"] for p in col.snapshot()["processes"]] == [sleeper.pid]
    assert not caplog.records


def test_process_exiting_between_listing_and_reading(sleeper):
    """The provider lists a live pid; it dies before the read."""
    def provider():
        pids = {"worker": [sleeper.pid]}
        sleeper.kill()
        sleeper.wait()
        return pids

    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg, pids_provider=provider)
    assert reg.get_sample_value("vllm_otel_process_count", {**I, "role": "worker"}) is None
    assert reg.get_sample_value("vllm_otel_host_memory_total_bytes", I) > 0


def test_host_metrics_present():
    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg, pids_provider=lambda: {})
    v = reg.get_sample_value
    total = v("vllm_otel_host_shm_total_bytes", I)
    used = v("vllm_otel_host_shm_used_bytes", I)
    assert total > 0 and 0 <= used <= total
    assert 0 < v("vllm_otel_host_memory_available_bytes", I) <= v("vllm_otel_host_memory_total_bytes", I)
    assert v("vllm_otel_host_load1", I) >= 0
    assert v("vllm_otel_host_load5", I) >= 0
    assert v("vllm_otel_host_load15", I) >= 0
    assert v("vllm_otel_host_cpu_count", I) == os.cpu_count()


def test_shm_counts_a_real_file():
    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg, pids_provider=lambda: {})
    before = reg.get_sample_value("vllm_otel_host_shm_used_bytes", I)
    path = f"/dev/shm/vllm_otel_test_{os.getpid()}"
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(8 * 1024 * 1024))
        after = reg.get_sample_value("vllm_otel_host_shm_used_bytes", I)
    finally:
        os.unlink(path)
    assert after - before >= 7 * 1024 * 1024  # other processes may use /dev/shm meanwhile


def test_missing_shm_is_skipped():
    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg, pids_provider=lambda: {}, shm_path="/nonexistent/shm")
    assert reg.get_sample_value("vllm_otel_host_shm_total_bytes", I) is None
    assert reg.get_sample_value("vllm_otel_host_memory_total_bytes", I) > 0


def test_failing_provider_keeps_host_metrics_and_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def provider():
        raise RuntimeError("cannot list")

    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg, pids_provider=provider)
    reg.collect()
    list(reg.collect())
    assert reg.get_sample_value("vllm_otel_host_memory_total_bytes", I) > 0
    assert len(caplog.records) == 1


def test_default_provider_reads_vllm_process_titles():
    """A real child that sets its title the way vLLM does (setproctitle, ``VLLM::<Name>``)."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import setproctitle, sys, time; setproctitle.setproctitle('VLLM::Worker_TP1'); "
         "print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        roles = default_pids_provider()
        assert roles["api_server"] == [os.getpid()]
        assert child.pid in roles["worker"]
        reg = CollectorRegistry()
        ProcessCollector("h:8000", registry=reg)
        # The worker's tensor-parallel rank comes from its title and labels its series.
        assert reg.get_sample_value("vllm_otel_process_threads", proc_labels("worker", child.pid, tp="1")) >= 1
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("title,role", [
    ("VLLM::EngineCore", "engine_core"),
    ("VLLM::EngineCore_DP1", "engine_core"),
    ("VLLM::Worker", "worker"),
    ("VLLM::Worker_DP0_TP3_EP3", "worker"),
    ("VLLM::APIServer_0", "api_server"),
    ("custom::DPCoordinator", "dp_coordinator"),
    ("/usr/bin/python -m vllm.entrypoints.openai.api_server", None),
    ("VLLM::EngineCoreish", None),
])
def test_role_from_title(title, role):
    assert role_from_title(title) == role


def test_unlabelled_child_is_child(sleeper):
    roles = default_pids_provider()
    assert sleeper.pid in roles["child"]


def test_snapshot_is_json_and_registration_reads_nothing(sleeper):
    calls = []

    def provider():
        calls.append(1)
        return {"api_server": [os.getpid()], "worker": [sleeper.pid]}

    reg = CollectorRegistry(auto_describe=True)
    col = ProcessCollector("h:8000", registry=reg, pids_provider=provider)
    assert calls == []
    snap = json.loads(json.dumps(col.snapshot()))
    assert snap["instance"] == "h:8000"
    assert {(p["role"], p["pid"]) for p in snap["processes"]} == {("api_server", os.getpid()),
                                                                  ("worker", sleeper.pid)}
    assert snap["processes"][0]["resident_memory_bytes"] > 0
    assert snap["host"]["memory_total_bytes"] > 0


def test_collect_is_cheap(sleeper):
    reg = CollectorRegistry()
    ProcessCollector("h:8000", registry=reg)
    t0 = time.perf_counter()
    for _ in range(20):
        list(reg.collect())
    assert (time.perf_counter() - t0) / 20 < 0.05
