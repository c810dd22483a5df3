"""Tests for vllm_otel.instrument.gpu and its parts (gpu_nvml, gpu_xid, gpu_metrics).

The no-GPU path uses the REAL pynvml (nvidia-ml-py) on this machine, where ``nvmlInit()`` raises
``NVMLError_LibraryNotFound``. Everything else uses a fake placed AT THE pynvml CALL BOUNDARY only:
``FakeNvml`` exposes the same function names, and reuses the real ``pynvml.NVMLError*`` classes,
constants and ctypes result structs (``c_nvmlMemory_t``, ``c_nvmlUtilization_t``), so the collector
sees exactly the types and exceptions the real library returns and raises. Errors are built the way
pynvml's ``_nvmlCheckReturn`` builds them: ``pynvml.NVMLError(<NVML_ERROR_* code>)``. Nothing inside
the collector is patched.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import time
import types

import pynvml
import pytest
from prometheus_client import CollectorRegistry

from vllm_otel.instrument.gpu import GpuCollector
from vllm_otel.instrument.gpu_nvml import decode_clocks_event_reasons

LOGGER = "vllm_otel.instrument.gpu"  # also the prefix of its parts: gpu_nvml, gpu_xid, gpu_metrics


def nvml_error(code: int) -> pynvml.NVMLError:
    """The exception pynvml raises for an NVML return code (a subclass such as NVMLError_NotSupported)."""
    return pynvml.NVMLError(code)


class FakeHandle:
    def __init__(self, index: int) -> None:
        self.index = index


class FakeNvml(types.SimpleNamespace):
    """pynvml's call surface over in-memory GPUs; constants and exceptions are the real ones."""

    def __init__(self, gpus: list[dict], fail: dict | None = None, missing: set[str] = frozenset()) -> None:
        super().__init__()
        self.missing = set(missing)  # functions an older pynvml does not have
        for name in dir(pynvml):
            if name.startswith(("NVMLError", "NVML_", "nvmlClocks", "nvmlEventType")):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = gpus
        self.handles = [FakeHandle(i) for i in range(len(gpus))]
        self.fail = fail or {}  # (gpu index, function name) -> exception to raise
        self.calls: list[str] = []
        self.events: queue.Queue = queue.Queue()
        self.registered: list[tuple[int, int]] = []
        self.event_sets_freed = 0

    def __getattribute__(self, name: str):
        if name != "missing" and name in object.__getattribute__(self, "missing"):
            raise AttributeError(f"module 'pynvml' has no attribute '{name}'")
        return object.__getattribute__(self, name)

    def _g(self, fn: str, handle: FakeHandle) -> dict:
        self.calls.append(fn)
        exc = self.fail.get((handle.index, fn))
        if exc is not None:
            raise exc
        return self.gpus[handle.index]

    # -- library
    def nvmlInit(self):
        self.calls.append("nvmlInit")

    def nvmlShutdown(self):
        self.calls.append("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.handles[index]

    # -- identity and basic readings
    def nvmlDeviceGetUUID(self, h):
        return self._g("nvmlDeviceGetUUID", h)["uuid"]

    def nvmlDeviceGetName(self, h):
        return self._g("nvmlDeviceGetName", h)["name"]

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._g("nvmlDeviceGetTemperature", h)["temp"]

    def nvmlDeviceGetTemperatureV(self, h, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._g("nvmlDeviceGetTemperatureV", h)["temp"]

    def nvmlDeviceGetTemperatureThreshold(self, h, threshold):
        assert threshold == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return self._g("nvmlDeviceGetTemperatureThreshold", h)["slowdown"]

    def nvmlDeviceGetPowerUsage(self, h):
        return self._g("nvmlDeviceGetPowerUsage", h)["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._g("nvmlDeviceGetEnforcedPowerLimit", h)["limit_mw"]

    def nvmlDeviceGetMemoryInfo(self, h):
        g = self._g("nvmlDeviceGetMemoryInfo", h)
        return pynvml.c_nvmlMemory_t(total=g["mem_total"], free=g["mem_total"] - g["mem_used"],
                                     used=g["mem_used"])

    def nvmlDeviceGetUtilizationRates(self, h):
        g = self._g("nvmlDeviceGetUtilizationRates", h)
        return pynvml.c_nvmlUtilization_t(gpu=g["util_gpu"], memory=g["util_mem"])

    def nvmlDeviceGetClockInfo(self, h, clock_type):
        assert clock_type == pynvml.NVML_CLOCK_SM
        return self._g("nvmlDeviceGetClockInfo", h)["sm_mhz"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._g("nvmlDeviceGetCurrentClocksEventReasons", h)["reasons"]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self._g("nvmlDeviceGetCurrentClocksThrottleReasons", h)["reasons"]

    # -- failure precursors
    def nvmlDeviceGetTotalEccErrors(self, h, error_type, counter_type):
        return self._g("nvmlDeviceGetTotalEccErrors", h)["ecc"][(error_type, counter_type)]

    def nvmlDeviceGetRetiredPages(self, h, cause):
        return self._g("nvmlDeviceGetRetiredPages", h)["retired"][cause]

    def nvmlDeviceGetRemappedRows(self, h):
        return self._g("nvmlDeviceGetRemappedRows", h)["remapped"]

    def nvmlDeviceGetNvLinkState(self, h, link):
        links = self._g("nvmlDeviceGetNvLinkState", h)["nvlinks"]  # list of (active, {counter: value})
        if not links:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= len(links):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED if links[link][0] else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, h, link, counter):
        return self._g("nvmlDeviceGetNvLinkErrorCounter", h)["nvlinks"][link][1][counter]

    def nvmlDeviceGetPcieReplayCounter(self, h):
        return self._g("nvmlDeviceGetPcieReplayCounter", h)["pcie_replay"]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=mem)
                for pid, mem in self._g("nvmlDeviceGetComputeRunningProcesses", h)["processes"]]

    # -- events
    def nvmlEventSetCreate(self):
        return object()

    def nvmlDeviceRegisterEvents(self, h, event_types, event_set):
        self.registered.append((h.index, event_types))

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        try:
            return self.events.get(timeout=timeout_ms / 1000.0)
        except queue.Empty:
            raise nvml_error(pynvml.NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetFree(self, event_set):
        self.event_sets_freed += 1


GIB = 1024**3


def make_gpu(i: int, **over) -> dict:
    g = {
        "uuid": f"GPU-0000-{i}",
        "name": "NVIDIA H100 80GB HBM3",
        "temp": 40 + i,
        "slowdown": 87,
        "power_mw": 250_500 + i * 1000,
        "limit_mw": 700_000,
        "mem_total": 80 * GIB,
        "mem_used": (10 + i) * GIB,
        "util_gpu": 75,
        "util_mem": 30 + i,
        "sm_mhz": 1980,
        "reasons": pynvml.nvmlClocksEventReasonNone,
        "ecc": {
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): 3,
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): 0,
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC): 17,
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC): 1,
        },
        "retired": {
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [0x1000, 0x2000],
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: [],
        },
        "remapped": (2, 1, 0, 0),
        "nvlinks": [],
        "pcie_replay": 5 + i,
        "processes": [(4000 + i, (1 + i) * 2**30)],  # the vLLM worker driving this GPU
    }
    g.update(over)
    return g


def nvlink_counters(replay=0, recovery=0, crc_flit=0, crc_data=0, ecc_data=0) -> dict:
    return {
        pynvml.NVML_NVLINK_ERROR_DL_REPLAY: replay,
        pynvml.NVML_NVLINK_ERROR_DL_RECOVERY: recovery,
        pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: crc_flit,
        pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA: crc_data,
        pynvml.NVML_NVLINK_ERROR_DL_ECC_DATA: ecc_data,
    }


def labels(i: int, **extra) -> dict:
    return {"instance": "h:8000", "engine": "0", "gpu": str(i), "uuid": f"GPU-0000-{i}",
            "name": "NVIDIA H100 80GB HBM3", **extra}


def start(fake: FakeNvml, **kw) -> tuple[GpuCollector, CollectorRegistry]:
    reg = CollectorRegistry()
    kw.setdefault("enable_xid_thread", False)
    kw.setdefault("refresh_interval_s", None)  # read at scrape: deterministic
    col = GpuCollector("h:8000", nvml=fake, registry=reg, **kw).start()
    return col, reg


def scrape(reg: CollectorRegistry):
    """One scrape (one NVML read in scrape mode), then lookups like ``registry.get_sample_value``."""
    samples = {(s.name, frozenset(s.labels.items())): s.value for m in reg.collect() for s in m.samples}
    return lambda name, lbls: samples.get((name, frozenset(lbls.items())))


def gpu_series(reg: CollectorRegistry) -> list:
    return [s for m in reg.collect() for s in m.samples]


# ---------------------------------------------------------------------------- no GPU (real pynvml)

def _real_nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_real_nvml_works(), reason="this machine has a working NVML; no-GPU path not reachable")
def test_no_gpu_real_pynvml_exports_only_up_zero_and_logs_once(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    reg = CollectorRegistry()
    col = GpuCollector("h:8000", registry=reg)  # default: imports the real pynvml
    col.start()
    col.start()  # idempotent: nvmlInit is not retried, nothing logged again
    col.refresh()

    assert reg.get_sample_value("vllm_otel_gpu_collector_up", {"instance": "h:8000"}) == 0.0
    samples = gpu_series(reg)
    assert [(s.name, s.labels) for s in samples] == [("vllm_otel_gpu_collector_up", {"instance": "h:8000"})]
    infos = [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "no NVIDIA GPU/NVML: GPU metrics disabled" in infos[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.WARNING]
    assert col.snapshot() == []
    assert col.up is False
    col.stop()


def test_pynvml_not_importable_is_the_same_no_gpu_path(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    reg = CollectorRegistry()
    GpuCollector("h:8000", registry=reg).start()
    assert reg.get_sample_value("vllm_otel_gpu_collector_up", {"instance": "h:8000"}) == 0.0
    assert len(gpu_series(reg)) == 1
    assert len([r for r in caplog.records if r.name.startswith(LOGGER)]) == 1


def test_registering_reads_nothing_and_duplicates_do_not_raise():
    fake = FakeNvml([make_gpu(0)])
    reg = CollectorRegistry(auto_describe=True)
    GpuCollector("h:8000", nvml=fake, registry=reg)
    GpuCollector("h:8000", nvml=fake, registry=reg)  # duplicate names: logged, not raised
    assert fake.calls == []


# ---------------------------------------------------------------------------- two fake GPUs

def test_two_gpus_exact_values():
    fake = FakeNvml([make_gpu(0), make_gpu(1)])
    col, reg = start(fake)
    v = reg.get_sample_value

    assert v("vllm_otel_gpu_collector_up", {"instance": "h:8000"}) == 1.0
    for i in (0, 1):
        assert v("vllm_otel_gpu_temperature_celsius", labels(i)) == 40 + i
        assert v("vllm_otel_gpu_slowdown_temperature_celsius", labels(i)) == 87
        assert v("vllm_otel_gpu_power_watts", labels(i)) == pytest.approx(250.5 + i)
        assert v("vllm_otel_gpu_power_limit_watts", labels(i)) == 700.0
        assert v("vllm_otel_gpu_memory_used_bytes", labels(i)) == (10 + i) * GIB
        assert v("vllm_otel_gpu_memory_total_bytes", labels(i)) == 80 * GIB
        assert v("vllm_otel_gpu_utilization_ratio", labels(i)) == pytest.approx(0.75)
        assert v("vllm_otel_gpu_memory_utilization_ratio", labels(i)) == pytest.approx((30 + i) / 100)
        assert v("vllm_otel_gpu_sm_clock_hertz", labels(i)) == 1980e6
        assert v("vllm_otel_gpu_ecc_errors_volatile_total", labels(i, error_type="corrected")) == 3
        assert v("vllm_otel_gpu_ecc_errors_volatile_total", labels(i, error_type="uncorrected")) == 0
        assert v("vllm_otel_gpu_ecc_errors_aggregate_total", labels(i, error_type="corrected")) == 17
        assert v("vllm_otel_gpu_ecc_errors_aggregate_total", labels(i, error_type="uncorrected")) == 1
        assert v("vllm_otel_gpu_retired_pages", labels(i, cause="multiple_single_bit_ecc")) == 2
        assert v("vllm_otel_gpu_retired_pages", labels(i, cause="double_bit_ecc")) == 0
        assert v("vllm_otel_gpu_remapped_rows", labels(i, error_type="corrected")) == 2
        assert v("vllm_otel_gpu_remapped_rows", labels(i, error_type="uncorrected")) == 1
        assert v("vllm_otel_gpu_row_remap_pending", labels(i)) == 0
        assert v("vllm_otel_gpu_row_remap_failure", labels(i)) == 0
        assert v("vllm_otel_gpu_pcie_replay_total", labels(i)) == 5 + i
        # Which process (worker rank) drives which GPU: joinable with vllm_otel_process_* on pid.
        assert v("vllm_otel_gpu_process_memory_bytes", labels(i, pid=str(4000 + i))) == (1 + i) * 2**30
        # No throttling: no reason series at all.
        assert not [s for s in gpu_series(reg) if s.name == "vllm_otel_gpu_clocks_event_reasons"]
    # The PCIe-only fakes have no NVLink: reported once as unsupported, per GPU.
    assert v("vllm_otel_gpu_collector_errors_total", {"instance": "h:8000", "field": "nvlink_state"}) == 2

    snap = col.snapshot()
    assert [s["gpu"] for s in snap] == [0, 1]
    assert snap[1]["uuid"] == "GPU-0000-1" and snap[1]["temperature_celsius"] == 41
    assert snap[0]["remapped_rows"] == {"corrected": 2, "uncorrected": 1, "pending": 0, "failure": 0}
    col.stop()
    assert fake.calls.count("nvmlInit") == 1 and fake.calls.count("nvmlShutdown") == 1
    assert reg.get_sample_value("vllm_otel_gpu_collector_up", {"instance": "h:8000"}) == 0.0


def test_device_indices_selects_gpus():
    fake = FakeNvml([make_gpu(0), make_gpu(1)])
    _, reg = start(fake, device_indices=[1])
    assert reg.get_sample_value("vllm_otel_gpu_temperature_celsius", labels(1)) == 41
    assert reg.get_sample_value("vllm_otel_gpu_temperature_celsius", labels(0)) is None


def test_nvlink_error_counters_for_active_links_only():
    links = [(True, nvlink_counters(replay=4, crc_flit=9)), (True, nvlink_counters(recovery=1)),
             (False, nvlink_counters(replay=99)), (False, nvlink_counters())]
    fake = FakeNvml([make_gpu(0, nvlinks=links)])
    col, reg = start(fake)
    v = reg.get_sample_value
    assert v("vllm_otel_gpu_nvlink_active_links", labels(0)) == 2
    assert v("vllm_otel_gpu_nvlink_errors_total", labels(0, link="0", error_type="replay")) == 4
    assert v("vllm_otel_gpu_nvlink_errors_total", labels(0, link="0", error_type="crc_flit")) == 9
    assert v("vllm_otel_gpu_nvlink_errors_total", labels(0, link="1", error_type="recovery")) == 1
    assert v("vllm_otel_gpu_nvlink_errors_total", labels(0, link="2", error_type="replay")) is None
    # InvalidArgument past the last link ends discovery; it is not an error.
    assert v("vllm_otel_gpu_collector_errors_total", {"instance": "h:8000", "field": "nvlink_state"}) is None
    col.refresh()  # discovery is cached: link 4 is never asked again
    n = fake.calls.count("nvmlDeviceGetNvLinkState")
    col.refresh()
    assert fake.calls.count("nvmlDeviceGetNvLinkState") - n == 4


# ---------------------------------------------------------------------------- per-field errors

def test_unsupported_field_keeps_the_others_and_counts_once():
    fake = FakeNvml(
        [make_gpu(0), make_gpu(1)],
        fail={
            (0, "nvmlDeviceGetTotalEccErrors"): nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED),
            (0, "nvmlDeviceGetPowerUsage"): nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST),
        },
    )
    col, reg = start(fake)
    col.refresh()
    v = scrape(reg)  # second read
    # GPU 0 lost only the failing fields.
    assert v("vllm_otel_gpu_ecc_errors_volatile_total", labels(0, error_type="corrected")) is None
    assert v("vllm_otel_gpu_power_watts", labels(0)) is None
    assert v("vllm_otel_gpu_temperature_celsius", labels(0)) == 40
    assert v("vllm_otel_gpu_power_limit_watts", labels(0)) == 700.0
    assert v("vllm_otel_gpu_pcie_replay_total", labels(0)) == 5
    # GPU 1 is untouched.
    assert v("vllm_otel_gpu_ecc_errors_volatile_total", labels(1, error_type="corrected")) == 3
    assert v("vllm_otel_gpu_power_watts", labels(1)) == pytest.approx(251.5)
    # NotSupported: counted once per (gpu, call) and never asked again (4 ECC calls on GPU 0);
    # a real error (GPU lost) is counted on every attempt.
    errors = {"instance": "h:8000", "field": "ecc_errors"}
    power_errors = {"instance": "h:8000", "field": "power"}
    assert v("vllm_otel_gpu_collector_errors_total", errors) == 4
    assert v("vllm_otel_gpu_collector_errors_total", power_errors) == 2
    calls = fake.calls.count("nvmlDeviceGetTotalEccErrors")
    v = scrape(reg)  # third read
    assert fake.calls.count("nvmlDeviceGetTotalEccErrors") - calls == 4  # GPU 1 only
    assert v("vllm_otel_gpu_collector_errors_total", errors) == 4
    assert v("vllm_otel_gpu_collector_errors_total", power_errors) == 3


def test_function_missing_from_old_pynvml_is_treated_as_unsupported():
    fake = FakeNvml([make_gpu(0, reasons=pynvml.nvmlClocksThrottleReasonSwPowerCap)],
                    missing={"nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetCurrentClocksEventReasons",
                             "nvmlDeviceGetTemperature"})
    assert not hasattr(fake, "nvmlDeviceGetPcieReplayCounter")
    col, reg = start(fake)
    col.refresh()
    v = scrape(reg)
    assert v("vllm_otel_gpu_temperature_celsius", labels(0)) == 40
    assert v("vllm_otel_gpu_pcie_replay_total", labels(0)) is None
    assert v("vllm_otel_gpu_collector_errors_total", {"instance": "h:8000", "field": "pcie_replay"}) == 1
    # Clocks reasons fell back to the throttle-reasons call, and falling back is not an error.
    assert v("vllm_otel_gpu_clocks_event_reasons", labels(0, reason="sw_power_cap")) == 1
    assert v("vllm_otel_gpu_collector_errors_total",
             {"instance": "h:8000", "field": "clocks_event_reasons"}) is None
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in fake.calls
    # Likewise the temperature came from the newer nvmlDeviceGetTemperatureV.
    assert "nvmlDeviceGetTemperatureV" in fake.calls
    assert v("vllm_otel_gpu_collector_errors_total", {"instance": "h:8000", "field": "temperature"}) is None


def test_driver_without_the_function_is_unsupported_too():
    """FunctionNotFound: pynvml has the wrapper but the installed driver lacks the symbol."""
    fake = FakeNvml([make_gpu(0)], fail={
        (0, "nvmlDeviceGetRemappedRows"): nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)})
    col, reg = start(fake)
    col.refresh()
    v = scrape(reg)
    assert v("vllm_otel_gpu_remapped_rows", labels(0, error_type="corrected")) is None
    assert v("vllm_otel_gpu_collector_errors_total", {"instance": "h:8000", "field": "remapped_rows"}) == 1
    assert fake.calls.count("nvmlDeviceGetRemappedRows") == 1


def test_forked_copy_reports_down_and_reads_nothing():
    fake = FakeNvml([make_gpu(0)])
    col, reg = start(fake)
    assert col.up
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what a scrape would show, then leave without pytest's cleanup
        try:
            n = len(fake.calls)
            v = scrape(reg)
            ok = (v("vllm_otel_gpu_collector_up", {"instance": "h:8000"}) == 0.0
                  and v("vllm_otel_gpu_temperature_celsius", labels(0)) is None
                  and len(fake.calls) == n and col.snapshot() == [])
            os.write(wfd, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(wfd)
    assert os.read(rfd, 8) == b"ok"
    os.close(rfd)
    os.waitpid(pid, 0)
    assert scrape(reg)("vllm_otel_gpu_collector_up", {"instance": "h:8000"}) == 1.0


def test_collect_never_raises_even_when_nvml_misbehaves():
    fake = FakeNvml([make_gpu(0)])
    def boom(handle):
        raise RuntimeError("not an NVMLError at all")

    fake.nvmlDeviceGetMemoryInfo = boom
    fake.nvmlDeviceGetRemappedRows = lambda h: "not a tuple"
    col, reg = start(fake)
    v = scrape(reg)
    assert v("vllm_otel_gpu_temperature_celsius", labels(0)) == 40
    assert v("vllm_otel_gpu_memory_used_bytes", labels(0)) is None
    assert v("vllm_otel_gpu_collector_errors_total", {"instance": "h:8000", "field": "memory"}) == 1
    assert v("vllm_otel_gpu_collector_errors_total", {"instance": "h:8000", "field": "remapped_rows"}) == 1


# ---------------------------------------------------------------------------- clocks reasons

def test_clocks_event_reason_bits_decoded():
    mask = (pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown
            | pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown)
    fake = FakeNvml([make_gpu(0, reasons=mask)])
    _, reg = start(fake)
    series = {s.labels["reason"]: s.value for s in gpu_series(reg)
              if s.name == "vllm_otel_gpu_clocks_event_reasons"}
    assert series == {"sw_power_cap": 1.0, "hw_thermal_slowdown": 1.0, "hw_power_brake_slowdown": 1.0}


def test_decode_every_named_reason_bit():
    names = {
        pynvml.nvmlClocksEventReasonGpuIdle: "gpu_idle",
        pynvml.nvmlClocksEventReasonApplicationsClocksSetting: "applications_clocks_setting",
        pynvml.nvmlClocksEventReasonSwPowerCap: "sw_power_cap",
        pynvml.nvmlClocksEventReasonHwSlowdown: "hw_slowdown",
        pynvml.nvmlClocksEventReasonSyncBoost: "sync_boost",
        pynvml.nvmlClocksEventReasonSwThermalSlowdown: "sw_thermal_slowdown",
        pynvml.nvmlClocksEventReasonHwThermalSlowdown: "hw_thermal_slowdown",
        pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown: "hw_power_brake_slowdown",
        pynvml.nvmlClocksEventReasonDisplayClockSetting: "display_clock_setting",
    }
    for bit, name in names.items():
        assert decode_clocks_event_reasons(bit) == [name]
    assert decode_clocks_event_reasons(0) == []
    assert decode_clocks_event_reasons(1 << 40) == ["bit_40"]


# ---------------------------------------------------------------------------- XID thread

def _wait_for(predicate, timeout_s=3.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_xid_event_counted_and_stop_is_prompt():
    fake = FakeNvml([make_gpu(0), make_gpu(1)])
    col, reg = start(fake, enable_xid_thread=True, xid_wait_ms=50)
    assert _wait_for(lambda: len(fake.registered) == 2)
    assert fake.registered == [(0, pynvml.nvmlEventTypeXidCriticalError),
                               (1, pynvml.nvmlEventTypeXidCriticalError)]
    # What nvmlEventSetWait_v2 returns: c_nvmlEventData_t's fields (a ctypes struct cannot hold a
    # fake handle, so the same field names on a namespace).
    event = types.SimpleNamespace(device=fake.handles[1], eventType=pynvml.nvmlEventTypeXidCriticalError,
                                  eventData=79, gpuInstanceId=0, computeInstanceId=0)
    before = time.time()
    fake.events.put(event)
    xid79 = labels(1, xid="79")
    assert _wait_for(lambda: reg.get_sample_value("vllm_otel_gpu_xid_errors_total", xid79) == 1.0)
    fake.events.put(event)
    assert _wait_for(lambda: reg.get_sample_value("vllm_otel_gpu_xid_errors_total", xid79) == 2.0)
    assert reg.get_sample_value("vllm_otel_gpu_last_xid", labels(1)) == 79
    assert reg.get_sample_value("vllm_otel_gpu_last_xid_timestamp_seconds", labels(1)) >= before
    assert reg.get_sample_value("vllm_otel_gpu_xid_errors_total", labels(0, xid="79")) is None
    assert col.snapshot()[1]["xid"]["counts"] == {"79": 2}

    thread = col._xid_thread
    t0 = time.monotonic()
    col.stop()
    assert time.monotonic() - t0 < 1.0
    assert not thread.is_alive()
    assert fake.event_sets_freed == 1


def test_xid_thread_survives_wait_errors_and_non_xid_events():
    fake = FakeNvml([make_gpu(0)])
    col, reg = start(fake, enable_xid_thread=True, xid_wait_ms=20)
    fake.events.put(types.SimpleNamespace(device=fake.handles[0], eventType=pynvml.nvmlEventTypePState,
                                          eventData=0))
    fake.events.put(types.SimpleNamespace(device=fake.handles[0],
                                          eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=48))
    assert _wait_for(lambda: reg.get_sample_value("vllm_otel_gpu_xid_errors_total", labels(0, xid="48")) == 1)
    assert reg.get_sample_value("vllm_otel_gpu_xid_errors_total", labels(0, xid="0")) is None
    col.stop()
    assert not col._xid_thread.is_alive()


def test_background_refresh_thread():
    fake = FakeNvml([make_gpu(0)])
    col, reg = start(fake, refresh_interval_s=0.02)
    assert _wait_for(lambda: reg.get_sample_value("vllm_otel_gpu_temperature_celsius", labels(0)) == 40)
    fake.gpus[0]["temp"] = 55
    assert _wait_for(lambda: reg.get_sample_value("vllm_otel_gpu_temperature_celsius", labels(0)) == 55)
    assert reg.get_sample_value("vllm_otel_gpu_last_refresh_timestamp_seconds", {"instance": "h:8000"}) > 0
    thread = col._refresh_thread
    col.stop()
    assert not thread.is_alive()


# ---------------------------------------------------------------------------- real GPU (skipped here)

@pytest.mark.skipif(not _real_nvml_works(), reason="needs a real NVIDIA GPU and driver")
def test_real_gpu_every_call_answers_or_is_unsupported():
    """On a GPU machine: the real pynvml, every call in the gpu, gpu_nvml and gpu_xid docstrings.
    Core fields must read; the others may be unsupported on that model, which must then show as a
    counted error only."""
    reg = CollectorRegistry()
    col = GpuCollector("h:8000", registry=reg, refresh_interval_s=None, xid_wait_ms=100).start()
    try:
        v = scrape(reg)
        assert v("vllm_otel_gpu_collector_up", {"instance": "h:8000"}) == 1.0
        snap = col.snapshot()
        assert snap, "no GPU listed"
        for gpu in snap:
            for key in ("temperature_celsius", "power_watts", "memory_total_bytes", "sm_clock_hertz"):
                assert key in gpu, (key, gpu)
            assert gpu["uuid"].startswith(("GPU-", "MIG-"))
        print(json.dumps(snap, indent=1))
        print({s.labels["field"]: s.value for m in reg.collect() for s in m.samples
               if s.name == "vllm_otel_gpu_collector_errors_total"})
        assert _wait_for(lambda: col._xid_thread is None or col._xid_thread.is_alive(), 1.0)
    finally:
        t0 = time.monotonic()
        col.stop()
        assert time.monotonic() - t0 < 2.0
