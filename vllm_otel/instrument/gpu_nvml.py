"""Reading NVML into plain dataclasses, one guarded call at a time (GPU health, read only).

Used by :class:`vllm_otel.instrument.gpu.GpuCollector`; never changes a GPU setting: every call
below only reads. Each call is guarded on its own, so one field the GPU does not support costs only
that field.

NVML calls made here (the list a check on a real GPU machine should exercise, one by one; the XID
event calls are in :mod:`vllm_otel.instrument.gpu_xid`, ``nvmlInit``/``nvmlShutdown`` in
:mod:`vllm_otel.instrument.gpu`):

- ``nvmlDeviceGetCount()``, ``nvmlDeviceGetHandleByIndex(i)``, ``nvmlDeviceGetUUID(h)``,
  ``nvmlDeviceGetName(h)``
- ``nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)``, falling back to
  ``nvmlDeviceGetTemperatureV(h, NVML_TEMPERATURE_GPU)`` (the old name is deprecated)
- ``nvmlDeviceGetTemperatureThreshold(h, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)``
- ``nvmlDeviceGetPowerUsage(h)`` (mW), ``nvmlDeviceGetEnforcedPowerLimit(h)`` (mW)
- ``nvmlDeviceGetMemoryInfo(h)`` (``.used``, ``.total``, bytes)
- ``nvmlDeviceGetUtilizationRates(h)`` (``.gpu``, ``.memory``, percent)
- ``nvmlDeviceGetClockInfo(h, NVML_CLOCK_SM)`` (MHz)
- ``nvmlDeviceGetCurrentClocksEventReasons(h)``, falling back to
  ``nvmlDeviceGetCurrentClocksThrottleReasons(h)`` (bitmask)
- ``nvmlDeviceGetTotalEccErrors(h, NVML_MEMORY_ERROR_TYPE_{CORRECTED,UNCORRECTED},
  NVML_{VOLATILE,AGGREGATE}_ECC)``
- ``nvmlDeviceGetRetiredPages(h, NVML_PAGE_RETIREMENT_CAUSE_{MULTIPLE_SINGLE_BIT_ECC_ERRORS,
  DOUBLE_BIT_ECC_ERROR})`` (list of page addresses; we export its length)
- ``nvmlDeviceGetRemappedRows(h)`` -> ``(corrected, uncorrected, pending, failure)``
- ``nvmlDeviceGetNvLinkState(h, link)`` (link discovery: scan until NotSupported/InvalidArgument)
- ``nvmlDeviceGetNvLinkErrorCounter(h, link, NVML_NVLINK_ERROR_DL_{REPLAY,RECOVERY,CRC_FLIT,
  CRC_DATA,ECC_DATA})`` for active links
- ``nvmlDeviceGetPcieReplayCounter(h)``
- ``nvmlDeviceGetComputeRunningProcesses(h)`` (``.pid``, ``.usedGpuMemory``): which process drives
  which GPU, so a worker's process series (with its TP/PP rank) join to its GPU on ``pid``

Errors (:meth:`NvmlReader.call`): ``NVMLError_NotSupported``, ``NVMLError_FunctionNotFound``,
``NVMLError_NoPermission`` and a function missing from an older pynvml (``AttributeError``) mark
that field unsupported for that GPU: counted once in ``vllm_otel_gpu_collector_errors_total{field}``
and not asked again. Any other error (``NVMLError_GpuIsLost``, ``NVMLError_Unknown``...) is counted
on every attempt, since a rising count is the symptom.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLOCKS_EVENT_REASONS", "GpuDevice", "GpuReading", "MISSING", "NvmlReader",
           "decode_clocks_event_reasons", "handle_key", "nvml_text"]

logger = logging.getLogger(__name__)

# Bit -> reason label. Values are NVML's nvmlClocksEventReason* constants (identical to the older
# nvmlClocksThrottleReason* ones); the last two exist only in the throttle-reason set.
CLOCKS_EVENT_REASONS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}

# Literal fallbacks for NVML constants, used only when an injected module lacks them.
_CONSTANTS = {
    "NVML_TEMPERATURE_GPU": 0,
    "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN": 1,
    "NVML_CLOCK_SM": 1,
    "NVML_MEMORY_ERROR_TYPE_CORRECTED": 0,
    "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
    "NVML_VOLATILE_ECC": 0,
    "NVML_AGGREGATE_ECC": 1,
    "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS": 0,
    "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR": 1,
    "NVML_NVLINK_ERROR_DL_REPLAY": 0,
    "NVML_NVLINK_ERROR_DL_RECOVERY": 1,
    "NVML_NVLINK_ERROR_DL_CRC_FLIT": 2,
    "NVML_NVLINK_ERROR_DL_CRC_DATA": 3,
    "NVML_NVLINK_ERROR_DL_ECC_DATA": 4,
    "NVML_NVLINK_MAX_LINKS": 18,
    "nvmlEventTypeXidCriticalError": 0x8,
}

_NVLINK_COUNTERS = [
    ("replay", "NVML_NVLINK_ERROR_DL_REPLAY"),
    ("recovery", "NVML_NVLINK_ERROR_DL_RECOVERY"),
    ("crc_flit", "NVML_NVLINK_ERROR_DL_CRC_FLIT"),
    ("crc_data", "NVML_NVLINK_ERROR_DL_CRC_DATA"),
    ("ecc_data", "NVML_NVLINK_ERROR_DL_ECC_DATA"),
]

MISSING = object()  # what a guarded call returns instead of raising


def decode_clocks_event_reasons(mask: int) -> list[str]:
    """Reason labels for the set bits of an NVML clocks-event bitmask (unknown bits as ``bit_N``)."""
    reasons = []
    for bit in range(64):
        flag = 1 << bit
        if mask & flag:
            reasons.append(CLOCKS_EVENT_REASONS.get(flag, f"bit_{bit}"))
    return reasons


def nvml_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def handle_key(handle: Any) -> Any:
    """Identity of an NVML device handle: the pointer address for real ctypes handles (an event's
    ``device`` is a new pointer object to the same device), the object itself for test fakes."""
    try:
        addr = ctypes.cast(handle, ctypes.c_void_p).value
        if addr is not None:
            return ("addr", addr)
    except Exception:  # noqa: BLE001 - not a ctypes pointer (fakes)
        pass
    return ("id", id(handle))


@dataclass
class GpuDevice:
    index: int
    handle: Any
    uuid: str
    name: str
    nvlinks: int | None = None  # number of NVLink links; None until discovered

    def labels(self, instance: str, engine: str) -> list[str]:
        return [instance, engine, str(self.index), self.uuid, self.name]


@dataclass
class GpuReading:
    """One refresh of one GPU. Absent values are simply not in the dicts."""

    device: GpuDevice
    gauges: dict[str, float] = field(default_factory=dict)  # metric suffix -> value
    reasons: list[str] | None = None
    ecc: dict[tuple[str, str], float] = field(default_factory=dict)  # (counter_type, error_type)
    retired_pages: dict[str, float] = field(default_factory=dict)  # cause -> pages
    remapped: tuple[float, float, float, float] | None = None
    nvlink_active: int | None = None
    nvlink_errors: dict[tuple[int, str], float] = field(default_factory=dict)
    pcie_replay: float | None = None
    processes: dict[int, float] = field(default_factory=dict)  # pid -> device memory used (bytes)


class NvmlReader:
    """Guarded NVML reads: device discovery, one :class:`GpuReading` per GPU, error counts.

    ``nvml`` is the (initialised) pynvml module or a fake at that boundary; it may be set after
    construction. Nothing here raises into the caller.
    """

    def __init__(self, nvml: Any = None, device_indices: list[int] | None = None) -> None:
        self.nvml = nvml
        self.wanted = list(device_indices) if device_indices is not None else None
        self.devices: dict[int, GpuDevice] = {}
        self._missing: list[int] = []  # indices whose handle could not be obtained yet
        self._unsupported: set[tuple[Any, ...]] = set()
        self._errors: dict[str, int] = {}
        self._lock = threading.Lock()  # guards the error counts (also written by the XID thread)

    @property
    def needs_discovery(self) -> bool:
        return self.wanted is None or bool(self._missing)

    def const(self, name: str) -> Any:
        return getattr(self.nvml, name, _CONSTANTS.get(name))

    def is_unsupported(self, exc: BaseException) -> bool:
        if isinstance(exc, AttributeError):
            return True
        kinds = tuple(
            k for k in (getattr(self.nvml, n, None) for n in (
                "NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission"))
            if isinstance(k, type))
        return bool(kinds) and isinstance(exc, kinds)

    def count_error(self, fieldname: str) -> None:
        with self._lock:
            self._errors[fieldname] = self._errors.get(fieldname, 0) + 1

    def errors(self) -> dict[str, int]:
        """A copy of the error counts by field."""
        with self._lock:
            return dict(self._errors)

    def call(self, gpu: int, fieldname: str, fn_name: str, *args: Any,
             key: tuple[Any, ...] = (), count_unsupported: bool = True) -> Any:
        """Call one NVML function; return ``MISSING`` instead of raising.

        Unsupported (see module docstring) is remembered per (gpu, field, key) and counted once.
        """
        ukey = (gpu, fieldname, *key)
        if ukey in self._unsupported:
            return MISSING
        try:
            return getattr(self.nvml, fn_name)(*args)
        except Exception as exc:  # noqa: BLE001
            if self.is_unsupported(exc):
                self._unsupported.add(ukey)
                if count_unsupported:
                    self.count_error(fieldname)
                logger.debug("GPU %s: %s not supported (%s)", gpu, fn_name, exc)
            else:
                self.count_error(fieldname)
                logger.debug("GPU %s: %s failed: %r", gpu, fn_name, exc)
            return MISSING

    def call_first(self, gpu: int, fieldname: str, candidates: list[tuple[str, tuple[Any, ...]]]) -> Any:
        """The first of equivalent calls (new and old names) that this pynvml/driver supports.

        Falling back is not an error; only the last candidate being unsupported is counted.
        """
        for i, (fn_name, args) in enumerate(candidates):
            last = i == len(candidates) - 1
            value = self.call(gpu, fieldname, fn_name, *args, key=(fn_name,), count_unsupported=last)
            if value is not MISSING or (gpu, fieldname, fn_name) not in self._unsupported:
                return value  # a value, or a real error (already counted): no fallback
        return MISSING

    def discover(self) -> None:
        """Resolve the wanted indices and acquire handles for those not yet held."""
        if self.wanted is None:
            count = self.call(-1, "device_count", "nvmlDeviceGetCount")
            if count is MISSING:
                return
            self.wanted = list(range(int(count)))
            self._missing = list(self.wanted)
        elif not self.devices and not self._missing:
            self._missing = list(self.wanted)
        still_missing = []
        for index in self._missing:
            handle = self.call(index, "device_handle", "nvmlDeviceGetHandleByIndex", index)
            if handle is MISSING:
                still_missing.append(index)
                continue
            uuid = self.call(index, "uuid", "nvmlDeviceGetUUID", handle)
            name = self.call(index, "name", "nvmlDeviceGetName", handle)
            self.devices[index] = GpuDevice(
                index=index, handle=handle,
                uuid="" if uuid is MISSING else nvml_text(uuid),
                name="" if name is MISSING else nvml_text(name))
        self._missing = still_missing

    def read_all(self) -> list[GpuReading]:
        """Discover what is still missing, then read every held GPU, in index order."""
        if self.needs_discovery:
            self.discover()
        return [self.read(dev) for _, dev in sorted(self.devices.items())]

    def read(self, dev: GpuDevice) -> GpuReading:
        g, h, r = dev.index, dev.handle, GpuReading(device=dev)

        def put(metric: str, value: Any, scale: float = 1.0) -> None:
            if value is not MISSING and value is not None:
                r.gauges[metric] = float(value) * scale

        sensor = self.const("NVML_TEMPERATURE_GPU")
        put("temperature_celsius", self.call_first(g, "temperature", [
            ("nvmlDeviceGetTemperature", (h, sensor)), ("nvmlDeviceGetTemperatureV", (h, sensor))]))
        put("slowdown_temperature_celsius",
            self.call(g, "slowdown_temperature", "nvmlDeviceGetTemperatureThreshold", h,
                      self.const("NVML_TEMPERATURE_THRESHOLD_SLOWDOWN")))
        put("power_watts", self.call(g, "power", "nvmlDeviceGetPowerUsage", h), 1e-3)
        put("power_limit_watts", self.call(g, "power_limit", "nvmlDeviceGetEnforcedPowerLimit", h), 1e-3)
        mem = self.call(g, "memory", "nvmlDeviceGetMemoryInfo", h)
        if mem is not MISSING:
            put("memory_used_bytes", getattr(mem, "used", None))
            put("memory_total_bytes", getattr(mem, "total", None))
        util = self.call(g, "utilization", "nvmlDeviceGetUtilizationRates", h)
        if util is not MISSING:
            put("utilization_ratio", getattr(util, "gpu", None), 0.01)
            put("memory_utilization_ratio", getattr(util, "memory", None), 0.01)
        put("sm_clock_hertz", self.call(g, "sm_clock", "nvmlDeviceGetClockInfo", h, self.const("NVML_CLOCK_SM")), 1e6)

        mask = self.call_first(g, "clocks_event_reasons", [
            ("nvmlDeviceGetCurrentClocksEventReasons", (h,)),
            ("nvmlDeviceGetCurrentClocksThrottleReasons", (h,))])
        if mask is not MISSING:
            r.reasons = decode_clocks_event_reasons(int(mask))

        for counter_type, ccons in (("volatile", "NVML_VOLATILE_ECC"), ("aggregate", "NVML_AGGREGATE_ECC")):
            for error_type, econs in (("corrected", "NVML_MEMORY_ERROR_TYPE_CORRECTED"),
                                      ("uncorrected", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED")):
                v = self.call(g, "ecc_errors", "nvmlDeviceGetTotalEccErrors", h, self.const(econs),
                              self.const(ccons), key=(counter_type, error_type))
                if v is not MISSING:
                    r.ecc[(counter_type, error_type)] = float(v)

        for cause, cons in (("multiple_single_bit_ecc", "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS"),
                            ("double_bit_ecc", "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR")):
            pages = self.call(g, "retired_pages", "nvmlDeviceGetRetiredPages", h, self.const(cons), key=(cause,))
            if pages is not MISSING:
                r.retired_pages[cause] = float(len(pages))

        rows = self.call(g, "remapped_rows", "nvmlDeviceGetRemappedRows", h)
        if rows is not MISSING:
            try:
                corr, unc, pending, failure = rows
                r.remapped = (float(corr), float(unc), float(bool(pending)), float(bool(failure)))
            except (TypeError, ValueError):
                self.count_error("remapped_rows")

        self._read_nvlink(dev, r)

        replay = self.call(g, "pcie_replay", "nvmlDeviceGetPcieReplayCounter", h)
        if replay is not MISSING:
            r.pcie_replay = float(replay)

        procs = self.call(g, "processes", "nvmlDeviceGetComputeRunningProcesses", h)
        if procs is not MISSING:
            for p in procs or ():
                pid = getattr(p, "pid", None)
                if pid is not None:
                    used = getattr(p, "usedGpuMemory", None)
                    # NVML reports "not available" (e.g. under MIG without privileges) as None.
                    r.processes[int(pid)] = float(used) if isinstance(used, (int, float)) else float("nan")
        return r

    def _read_nvlink(self, dev: GpuDevice, r: GpuReading) -> None:
        g, h = dev.index, dev.handle
        if dev.nvlinks is None:
            # Discovery: links are numbered from 0 and the first index NVML rejects (InvalidArgument
            # past the last link, NotSupported without NVLink) ends the scan. Any other error leaves
            # discovery for the next refresh rather than caching a short link count.
            invalid = getattr(self.nvml, "NVMLError_InvalidArgument", None)
            n = 0
            for link in range(int(self.const("NVML_NVLINK_MAX_LINKS"))):
                try:
                    self.nvml.nvmlDeviceGetNvLinkState(h, link)
                except Exception as exc:  # noqa: BLE001
                    unsupported = self.is_unsupported(exc)
                    if not unsupported and not (isinstance(invalid, type) and isinstance(exc, invalid)):
                        self.count_error("nvlink_state")
                        return
                    if link == 0 and unsupported:
                        self.count_error("nvlink_state")  # no NVLink: counted once, like any field
                    break
                n = link + 1
            dev.nvlinks = n
        if not dev.nvlinks:
            return
        active = 0
        for link in range(dev.nvlinks):
            state = self.call(g, "nvlink_state", "nvmlDeviceGetNvLinkState", h, link, key=(link,))
            if state is MISSING or not state:
                continue
            active += 1
            for label, cons in _NVLINK_COUNTERS:
                v = self.call(g, "nvlink_errors", "nvmlDeviceGetNvLinkErrorCounter", h, link,
                              self.const(cons), key=(link, label))
                if v is not MISSING:
                    r.nvlink_errors[(link, label)] = float(v)
        r.nvlink_active = active
