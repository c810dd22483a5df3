"""GPU health from NVML, published through a prometheus_client custom Collector.

Runs inside vLLM processes, so it never raises into its caller, imports ``pynvml`` (nvidia-ml-py)
only in :meth:`GpuCollector.start`, and never changes a GPU setting: every call below only reads.
Each call is guarded on its own, so one field the GPU does not support costs only that field.

NVML calls used (the list a check on a real GPU machine should exercise, one by one):

- ``nvmlInit()``, ``nvmlShutdown()``
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
- XID thread: ``nvmlEventSetCreate()``, ``nvmlDeviceRegisterEvents(h,
  nvmlEventTypeXidCriticalError, set)``, ``nvmlEventSetWait_v2(set, timeout_ms)`` (falling back to
  ``nvmlEventSetWait``; ``NVMLError_Timeout`` means "no event"), ``nvmlEventSetFree(set)``

Errors: ``NVMLError_NotSupported``, ``NVMLError_FunctionNotFound``, ``NVMLError_NoPermission`` and a
function missing from an older pynvml (``AttributeError``) mark that field unsupported for that GPU:
counted once in ``vllm_otel_gpu_collector_errors_total{field}`` and not asked again. Any other error
(``NVMLError_GpuIsLost``, ``NVMLError_Unknown``...) is counted on every attempt, since a rising count
is the symptom.

A process forked after ``start()`` reports ``collector_up 0`` and reads nothing: NVML state and
threads do not survive a fork, so call ``start()`` in the process that serves ``/metrics``.

Values are read by a background refresh thread every ``refresh_interval_s`` (default), so a scrape
never waits on NVML; ``refresh_interval_s=None`` reads at scrape time instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["GpuCollector", "CLOCKS_EVENT_REASONS", "decode_clocks_event_reasons"]

logger = logging.getLogger(__name__)

PREFIX = "vllm_otel_gpu_"
GPU_LABELS = ["instance", "engine", "gpu", "uuid", "name"]

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

_MISSING = object()


def decode_clocks_event_reasons(mask: int) -> list[str]:
    """Reason labels for the set bits of an NVML clocks-event bitmask (unknown bits as ``bit_N``)."""
    reasons = []
    for bit in range(64):
        flag = 1 << bit
        if mask & flag:
            reasons.append(CLOCKS_EVENT_REASONS.get(flag, f"bit_{bit}"))
    return reasons


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _handle_key(handle: Any) -> Any:
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
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str
    nvlinks: int | None = None  # number of NVLink links; None until discovered

    def labels(self, instance: str, engine: str) -> list[str]:
        return [instance, engine, str(self.index), self.uuid, self.name]


@dataclass
class _Reading:
    """One refresh of one GPU. Absent values are simply not in the dicts."""

    device: _Device
    gauges: dict[str, float] = field(default_factory=dict)  # metric suffix -> value
    reasons: list[str] | None = None
    ecc: dict[tuple[str, str], float] = field(default_factory=dict)  # (counter_type, error_type)
    retired_pages: dict[str, float] = field(default_factory=dict)  # cause -> pages
    remapped: tuple[float, float, float, float] | None = None
    nvlink_active: int | None = None
    nvlink_errors: dict[tuple[int, str], float] = field(default_factory=dict)
    pcie_replay: float | None = None
    processes: dict[int, float] = field(default_factory=dict)  # pid -> device memory used (bytes)


class GpuCollector:
    """Per-GPU health metrics from NVML (``vllm_otel_gpu_*``), plus an XID event watcher.

    ``start()`` initialises NVML once; without a GPU/driver/pynvml it logs one INFO line and the
    collector exports only ``vllm_otel_gpu_collector_up{instance} 0``. ``stop()`` ends the threads
    and shuts NVML down; it is final. Nothing here raises into the caller.
    """

    def __init__(
        self,
        instance: str,
        engine: str = "0",
        device_indices: list[int] | None = None,
        nvml: Any = None,
        registry: Any = None,
        enable_xid_thread: bool = True,
        refresh_interval_s: float | None = 5.0,
        xid_wait_ms: int = 500,
    ) -> None:
        self.instance = str(instance)
        self.engine = str(engine)
        self._wanted = list(device_indices) if device_indices is not None else None
        self._nvml = nvml
        self._enable_xid = enable_xid_thread
        self._interval = refresh_interval_s if refresh_interval_s and refresh_interval_s > 0 else None
        self._xid_wait_ms = int(xid_wait_ms)

        self._lock = threading.Lock()  # guards the counters / XID state below
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._stop = threading.Event()
        self._started = False
        self._stopped = False
        self._up = False
        self._pid = os.getpid()  # a forked copy must not use the parent's NVML state or threads
        self._devices: dict[int, _Device] = {}
        self._missing: list[int] = []  # indices whose handle could not be obtained yet
        self._unsupported: set[tuple[Any, ...]] = set()
        self._errors: dict[str, int] = {}
        self._readings: list[_Reading] = []
        self._last_refresh: float | None = None
        self._xid_counts: dict[tuple[int, int], int] = {}
        self._xid_last: dict[int, tuple[int, float]] = {}
        self._xid_devices: dict[int, _Device] = {}  # XID events seen on a device we do not watch
        self._refresh_thread: threading.Thread | None = None
        self._xid_thread: threading.Thread | None = None

        if registry is not None:
            try:
                registry.register(self)
            except Exception:  # noqa: BLE001 - e.g. a duplicate; never fail vLLM for metrics
                logger.warning("vllm-otel: could not register the GPU collector", exc_info=True)

    # ------------------------------------------------------------------ lifecycle

    @property
    def up(self) -> bool:
        """True once NVML initialised (and until ``stop()``), in the process that started it."""
        return self._up and os.getpid() == self._pid

    def start(self) -> "GpuCollector":
        """Initialise NVML (once), find the devices, start the refresh and XID threads."""
        if self._started:
            return self
        self._started = True
        self._pid = os.getpid()
        try:
            if self._nvml is None:
                import pynvml  # noqa: PLC0415 - lazy: vLLM processes without GPUs never pay for it

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - LibraryNotFound, DriverNotLoaded, ImportError...
            logger.info("no NVIDIA GPU/NVML: GPU metrics disabled (%s: %s)", type(exc).__name__, exc)
            return self
        self._up = True
        try:
            self._discover()
            if self._interval is not None:
                self._refresh_thread = threading.Thread(
                    target=self._refresh_loop, name="vllm-otel-gpu-refresh", daemon=True)
                self._refresh_thread.start()
            if self._enable_xid and self._devices:
                self._xid_thread = threading.Thread(
                    target=self._xid_loop, name="vllm-otel-gpu-xid", daemon=True)
                self._xid_thread.start()
        except Exception:  # noqa: BLE001
            logger.warning("vllm-otel: GPU collector start failed partway", exc_info=True)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the threads (waiting up to ``timeout_s`` each) and shut NVML down. Final."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        for thread in (self._xid_thread, self._refresh_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout_s)
        if self.up:
            self._up = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                logger.debug("nvmlShutdown failed", exc_info=True)

    # ------------------------------------------------------------------ NVML access

    def _const(self, name: str) -> Any:
        return getattr(self._nvml, name, _CONSTANTS.get(name))

    def _is_unsupported(self, exc: BaseException) -> bool:
        if isinstance(exc, AttributeError):
            return True
        kinds = tuple(
            k for k in (getattr(self._nvml, n, None) for n in (
                "NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission"))
            if isinstance(k, type))
        return bool(kinds) and isinstance(exc, kinds)

    def _count_error(self, fieldname: str) -> None:
        with self._lock:
            self._errors[fieldname] = self._errors.get(fieldname, 0) + 1

    def _call(self, gpu: int, fieldname: str, fn_name: str, *args: Any,
              key: tuple[Any, ...] = (), count_unsupported: bool = True) -> Any:
        """Call one NVML function; return ``_MISSING`` instead of raising.

        Unsupported (see module docstring) is remembered per (gpu, field, key) and counted once.
        """
        ukey = (gpu, fieldname, *key)
        if ukey in self._unsupported:
            return _MISSING
        try:
            return getattr(self._nvml, fn_name)(*args)
        except Exception as exc:  # noqa: BLE001
            if self._is_unsupported(exc):
                self._unsupported.add(ukey)
                if count_unsupported:
                    self._count_error(fieldname)
                logger.debug("GPU %s: %s not supported (%s)", gpu, fn_name, exc)
            else:
                self._count_error(fieldname)
                logger.debug("GPU %s: %s failed: %r", gpu, fn_name, exc)
            return _MISSING

    def _call_first(self, gpu: int, fieldname: str, candidates: list[tuple[str, tuple[Any, ...]]]) -> Any:
        """The first of equivalent calls (new and old names) that this pynvml/driver supports.

        Falling back is not an error; only the last candidate being unsupported is counted.
        """
        for i, (fn_name, args) in enumerate(candidates):
            last = i == len(candidates) - 1
            value = self._call(gpu, fieldname, fn_name, *args, key=(fn_name,), count_unsupported=last)
            if value is not _MISSING or (gpu, fieldname, fn_name) not in self._unsupported:
                return value  # a value, or a real error (already counted): no fallback
        return _MISSING

    def _discover(self) -> None:
        """Resolve the wanted indices and acquire handles for those not yet held."""
        if self._wanted is None:
            count = self._call(-1, "device_count", "nvmlDeviceGetCount")
            if count is _MISSING:
                return
            self._wanted = list(range(int(count)))
            self._missing = list(self._wanted)
        elif not self._devices and not self._missing:
            self._missing = list(self._wanted)
        still_missing = []
        for index in self._missing:
            handle = self._call(index, "device_handle", "nvmlDeviceGetHandleByIndex", index)
            if handle is _MISSING:
                still_missing.append(index)
                continue
            uuid = self._call(index, "uuid", "nvmlDeviceGetUUID", handle)
            name = self._call(index, "name", "nvmlDeviceGetName", handle)
            self._devices[index] = _Device(
                index=index, handle=handle,
                uuid="" if uuid is _MISSING else _text(uuid),
                name="" if name is _MISSING else _text(name))
        self._missing = still_missing

    # ------------------------------------------------------------------ refresh

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self._interval or 5.0)

    def refresh(self) -> None:
        """Read every field of every GPU now (normally called by the refresh thread)."""
        if not self.up or self._stopped:
            return
        if not self._refresh_lock.acquire(blocking=False):
            return  # a refresh is running; the scrape serves the previous one
        try:
            if self._wanted is None or self._missing:
                self._discover()
            readings = [self._read(dev) for _, dev in sorted(self._devices.items())]
            self._readings = readings
            self._last_refresh = time.time()
        except Exception:  # noqa: BLE001
            logger.debug("GPU refresh failed", exc_info=True)
        finally:
            self._refresh_lock.release()

    def _read(self, dev: _Device) -> _Reading:
        g, h, r = dev.index, dev.handle, _Reading(device=dev)

        def put(metric: str, value: Any, scale: float = 1.0) -> None:
            if value is not _MISSING and value is not None:
                r.gauges[metric] = float(value) * scale

        sensor = self._const("NVML_TEMPERATURE_GPU")
        put("temperature_celsius", self._call_first(g, "temperature", [
            ("nvmlDeviceGetTemperature", (h, sensor)), ("nvmlDeviceGetTemperatureV", (h, sensor))]))
        put("slowdown_temperature_celsius",
            self._call(g, "slowdown_temperature", "nvmlDeviceGetTemperatureThreshold", h,
                       self._const("NVML_TEMPERATURE_THRESHOLD_SLOWDOWN")))
        put("power_watts", self._call(g, "power", "nvmlDeviceGetPowerUsage", h), 1e-3)
        put("power_limit_watts", self._call(g, "power_limit", "nvmlDeviceGetEnforcedPowerLimit", h), 1e-3)
        mem = self._call(g, "memory", "nvmlDeviceGetMemoryInfo", h)
        if mem is not _MISSING:
            put("memory_used_bytes", getattr(mem, "used", None))
            put("memory_total_bytes", getattr(mem, "total", None))
        util = self._call(g, "utilization", "nvmlDeviceGetUtilizationRates", h)
        if util is not _MISSING:
            put("utilization_ratio", getattr(util, "gpu", None), 0.01)
            put("memory_utilization_ratio", getattr(util, "memory", None), 0.01)
        put("sm_clock_hertz", self._call(g, "sm_clock", "nvmlDeviceGetClockInfo", h, self._const("NVML_CLOCK_SM")), 1e6)

        mask = self._call_first(g, "clocks_event_reasons", [
            ("nvmlDeviceGetCurrentClocksEventReasons", (h,)),
            ("nvmlDeviceGetCurrentClocksThrottleReasons", (h,))])
        if mask is not _MISSING:
            r.reasons = decode_clocks_event_reasons(int(mask))

        for counter_type, ccons in (("volatile", "NVML_VOLATILE_ECC"), ("aggregate", "NVML_AGGREGATE_ECC")):
            for error_type, econs in (("corrected", "NVML_MEMORY_ERROR_TYPE_CORRECTED"),
                                      ("uncorrected", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED")):
                v = self._call(g, "ecc_errors", "nvmlDeviceGetTotalEccErrors", h, self._const(econs),
                               self._const(ccons), key=(counter_type, error_type))
                if v is not _MISSING:
                    r.ecc[(counter_type, error_type)] = float(v)

        for cause, cons in (("multiple_single_bit_ecc", "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS"),
                            ("double_bit_ecc", "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR")):
            pages = self._call(g, "retired_pages", "nvmlDeviceGetRetiredPages", h, self._const(cons), key=(cause,))
            if pages is not _MISSING:
                r.retired_pages[cause] = float(len(pages))

        rows = self._call(g, "remapped_rows", "nvmlDeviceGetRemappedRows", h)
        if rows is not _MISSING:
            try:
                corr, unc, pending, failure = rows
                r.remapped = (float(corr), float(unc), float(bool(pending)), float(bool(failure)))
            except (TypeError, ValueError):
                self._count_error("remapped_rows")

        self._read_nvlink(dev, r)

        replay = self._call(g, "pcie_replay", "nvmlDeviceGetPcieReplayCounter", h)
        if replay is not _MISSING:
            r.pcie_replay = float(replay)

        procs = self._call(g, "processes", "nvmlDeviceGetComputeRunningProcesses", h)
        if procs is not _MISSING:
            for p in procs or ():
                pid = getattr(p, "pid", None)
                if pid is not None:
                    used = getattr(p, "usedGpuMemory", None)
                    # NVML reports "not available" (e.g. under MIG without privileges) as None.
                    r.processes[int(pid)] = float(used) if isinstance(used, (int, float)) else float("nan")
        return r

    def _read_nvlink(self, dev: _Device, r: _Reading) -> None:
        g, h = dev.index, dev.handle
        if dev.nvlinks is None:
            # Discovery: links are numbered from 0 and the first index NVML rejects (InvalidArgument
            # past the last link, NotSupported without NVLink) ends the scan. Any other error leaves
            # discovery for the next refresh rather than caching a short link count.
            invalid = getattr(self._nvml, "NVMLError_InvalidArgument", None)
            n = 0
            for link in range(int(self._const("NVML_NVLINK_MAX_LINKS"))):
                try:
                    self._nvml.nvmlDeviceGetNvLinkState(h, link)
                except Exception as exc:  # noqa: BLE001
                    unsupported = self._is_unsupported(exc)
                    if not unsupported and not (isinstance(invalid, type) and isinstance(exc, invalid)):
                        self._count_error("nvlink_state")
                        return
                    if link == 0 and unsupported:
                        self._count_error("nvlink_state")  # no NVLink: counted once, like any field
                    break
                n = link + 1
            dev.nvlinks = n
        if not dev.nvlinks:
            return
        active = 0
        for link in range(dev.nvlinks):
            state = self._call(g, "nvlink_state", "nvmlDeviceGetNvLinkState", h, link, key=(link,))
            if state is _MISSING or not state:
                continue
            active += 1
            for label, cons in _NVLINK_COUNTERS:
                v = self._call(g, "nvlink_errors", "nvmlDeviceGetNvLinkErrorCounter", h, link,
                               self._const(cons), key=(link, label))
                if v is not _MISSING:
                    r.nvlink_errors[(link, label)] = float(v)
        r.nvlink_active = active

    # ------------------------------------------------------------------ XID events

    def _xid_loop(self) -> None:
        nv = self._nvml
        try:
            event_set = nv.nvmlEventSetCreate()
        except Exception:  # noqa: BLE001
            self._count_error("xid_event_set")
            logger.debug("nvmlEventSetCreate failed; XID events not watched", exc_info=True)
            return
        try:
            xid_type = self._const("nvmlEventTypeXidCriticalError")
            watched = 0
            for dev in list(self._devices.values()):
                try:
                    nv.nvmlDeviceRegisterEvents(dev.handle, xid_type, event_set)
                    watched += 1
                except Exception:  # noqa: BLE001
                    self._count_error("xid_register")
                    logger.debug("GPU %s: XID events not available", dev.index, exc_info=True)
            if not watched:
                return
            wait = getattr(nv, "nvmlEventSetWait_v2", None) or getattr(nv, "nvmlEventSetWait")
            timeout_cls = getattr(nv, "NVMLError_Timeout", None)
            while not self._stop.is_set():
                try:
                    data = wait(event_set, self._xid_wait_ms)
                except Exception as exc:  # noqa: BLE001
                    if isinstance(timeout_cls, type) and isinstance(exc, timeout_cls):
                        continue
                    self._count_error("xid_wait")
                    logger.debug("nvmlEventSetWait failed", exc_info=True)
                    self._stop.wait(1.0)  # do not spin on a broken event set
                    continue
                try:
                    self._record_event(data)
                except Exception:  # noqa: BLE001
                    self._count_error("xid_event")
                    logger.debug("bad NVML event", exc_info=True)
        except Exception:  # noqa: BLE001
            self._count_error("xid_event")
            logger.debug("XID thread failed", exc_info=True)
        finally:
            try:
                nv.nvmlEventSetFree(event_set)
            except Exception:  # noqa: BLE001
                logger.debug("nvmlEventSetFree failed", exc_info=True)

    def _device_for_event(self, handle: Any) -> _Device:
        key = _handle_key(handle)
        for dev in self._devices.values():
            if dev.handle is handle or _handle_key(dev.handle) == key:
                return dev
        uuid = self._call(-1, "xid_event", "nvmlDeviceGetUUID", handle)
        if uuid is not _MISSING:
            for dev in self._devices.values():
                if dev.uuid == _text(uuid):
                    return dev
        unknown = self._xid_devices.setdefault(-1, _Device(index=-1, handle=None, uuid="", name=""))
        return unknown

    def _record_event(self, data: Any) -> None:
        xid_type = int(self._const("nvmlEventTypeXidCriticalError"))
        event_type = int(getattr(data, "eventType", xid_type))
        if not event_type & xid_type:
            return
        code = int(data.eventData)
        dev = self._device_for_event(getattr(data, "device", None))
        now = time.time()
        with self._lock:
            key = (dev.index, code)
            self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
            self._xid_last[dev.index] = (code, now)
        logger.warning("GPU %s (%s) reported XID %d", dev.index, dev.uuid, code)

    def _device_by_index(self, index: int) -> _Device | None:
        return self._devices.get(index) or self._xid_devices.get(index)

    # ------------------------------------------------------------------ export

    def _families(self) -> dict[str, Metric]:
        def gauge(name: str, doc: str, extra: Iterable[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=GPU_LABELS + list(extra))

        def counter(name: str, doc: str, extra: Iterable[str] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=GPU_LABELS + list(extra))

        fams: dict[str, Metric] = {
            "collector_up": GaugeMetricFamily(
                PREFIX + "collector_up", "1 when NVML is available and the GPU collector runs, else 0",
                labels=["instance"]),
            "collector_errors": CounterMetricFamily(
                PREFIX + "collector_errors",
                "NVML reads that failed, by field (an unsupported field is counted once)",
                labels=["instance", "field"]),
            "last_refresh": GaugeMetricFamily(
                PREFIX + "last_refresh_timestamp_seconds", "Unix time of the last completed NVML refresh",
                labels=["instance"]),
            "temperature_celsius": gauge("temperature_celsius", "GPU core temperature"),
            "slowdown_temperature_celsius": gauge(
                "slowdown_temperature_celsius", "Temperature at which the GPU starts to slow down"),
            "power_watts": gauge("power_watts", "Power draw"),
            "power_limit_watts": gauge("power_limit_watts", "Enforced power limit"),
            "memory_used_bytes": gauge("memory_used_bytes", "Device memory in use (all processes)"),
            "memory_total_bytes": gauge("memory_total_bytes", "Device memory size"),
            "utilization_ratio": gauge(
                "utilization_ratio", "Fraction of the last sample period a kernel was running"),
            "memory_utilization_ratio": gauge(
                "memory_utilization_ratio",
                "Fraction of the last sample period device memory was read or written (not capacity)"),
            "sm_clock_hertz": gauge("sm_clock_hertz", "Current SM clock"),
            "clocks_event_reasons": gauge(
                "clocks_event_reasons", "1 for each reason currently holding clocks down (throttling)",
                ["reason"]),
            "ecc_volatile": counter(
                "ecc_errors_volatile", "ECC errors since the last driver load", ["error_type"]),
            "ecc_aggregate": counter(
                "ecc_errors_aggregate", "ECC errors over the GPU's lifetime", ["error_type"]),
            "retired_pages": gauge("retired_pages", "Retired device memory pages, by cause", ["cause"]),
            "remapped_rows": gauge(
                "remapped_rows", "Memory rows remapped, by the error type that caused it", ["error_type"]),
            "row_remap_pending": gauge(
                "row_remap_pending", "1 when a row remap is pending (needs a GPU reset)"),
            "row_remap_failure": gauge(
                "row_remap_failure", "1 when a row remap has failed (GPU should be serviced)"),
            "nvlink_active_links": gauge("nvlink_active_links", "NVLink links currently active"),
            "nvlink_errors": counter(
                "nvlink_errors", "NVLink data-link error counters, per active link",
                ["link", "error_type"]),
            "pcie_replay": counter("pcie_replay", "PCIe replay counter"),
            "process_memory_bytes": gauge(
                "process_memory_bytes",
                "Device memory used by a process on this GPU (join to vllm_otel_process_* on pid)",
                ["pid"]),
            "xid_errors": counter("xid_errors", "XID critical error events seen by this process", ["xid"]),
            "last_xid": gauge("last_xid", "Code of the last XID event seen by this process"),
            "last_xid_timestamp": gauge(
                "last_xid_timestamp_seconds", "Unix time of the last XID event seen by this process"),
        }
        return fams

    def describe(self) -> Iterator[Metric]:
        """Names only, so registering never touches NVML (and duplicates are detected)."""
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        try:
            if self.up and self._interval is None:
                self.refresh()
            metrics = self._build()
        except Exception:  # noqa: BLE001 - a scrape must not fail because of us
            logger.debug("GPU collect failed", exc_info=True)
            up = GaugeMetricFamily(PREFIX + "collector_up", "1 when NVML is available and the GPU "
                                   "collector runs, else 0", labels=["instance"])
            up.add_metric([self.instance], 0.0)
            metrics = [up]
        return iter(metrics)

    def _build(self) -> list[Metric]:
        fams = self._families()
        up = self.up
        fams["collector_up"].add_metric([self.instance], 1.0 if up else 0.0)
        if not up:
            return [fams["collector_up"]]
        with self._lock:
            errors = dict(self._errors)
            xid_counts = dict(self._xid_counts)
            xid_last = dict(self._xid_last)
        for fname, n in sorted(errors.items()):
            fams["collector_errors"].add_metric([self.instance, fname], float(n))
        if self._last_refresh is not None:
            fams["last_refresh"].add_metric([self.instance], self._last_refresh)
        for r in self._readings:
            labels = r.device.labels(self.instance, self.engine)
            for metric, value in r.gauges.items():
                fams[metric].add_metric(labels, value)
            for reason in r.reasons or ():
                fams["clocks_event_reasons"].add_metric(labels + [reason], 1.0)
            for (counter_type, error_type), value in sorted(r.ecc.items()):
                fams["ecc_" + counter_type].add_metric(labels + [error_type], value)
            for cause, value in r.retired_pages.items():
                fams["retired_pages"].add_metric(labels + [cause], value)
            if r.remapped is not None:
                corr, unc, pending, failure = r.remapped
                fams["remapped_rows"].add_metric(labels + ["corrected"], corr)
                fams["remapped_rows"].add_metric(labels + ["uncorrected"], unc)
                fams["row_remap_pending"].add_metric(labels, pending)
                fams["row_remap_failure"].add_metric(labels, failure)
            if r.nvlink_active is not None:
                fams["nvlink_active_links"].add_metric(labels, float(r.nvlink_active))
            for (link, error_type), value in sorted(r.nvlink_errors.items()):
                fams["nvlink_errors"].add_metric(labels + [str(link), error_type], value)
            if r.pcie_replay is not None:
                fams["pcie_replay"].add_metric(labels, r.pcie_replay)
            for pid, used in sorted(r.processes.items()):
                fams["process_memory_bytes"].add_metric(labels + [str(pid)], used)
        for (index, code), n in sorted(xid_counts.items()):
            dev = self._device_by_index(index)
            if dev is not None:
                fams["xid_errors"].add_metric(dev.labels(self.instance, self.engine) + [str(code)], float(n))
        for index, (code, ts) in sorted(xid_last.items()):
            dev = self._device_by_index(index)
            if dev is not None:
                labels = dev.labels(self.instance, self.engine)
                fams["last_xid"].add_metric(labels, float(code))
                fams["last_xid_timestamp"].add_metric(labels, ts)
        return [f for f in fams.values() if f.samples]

    def snapshot(self) -> list[dict[str, Any]]:
        """The latest reading of every GPU as JSON-ready dicts (empty without NVML)."""
        try:
            if not self.up:
                return []
            with self._lock:
                xid_counts = dict(self._xid_counts)
                xid_last = dict(self._xid_last)
            out = []
            for r in self._readings:
                d = r.device
                item: dict[str, Any] = {"gpu": d.index, "uuid": d.uuid, "name": d.name, **r.gauges}
                if r.reasons is not None:
                    item["clocks_event_reasons"] = list(r.reasons)
                if r.ecc:
                    item["ecc_errors"] = {f"{c}_{e}": v for (c, e), v in sorted(r.ecc.items())}
                if r.retired_pages:
                    item["retired_pages"] = dict(r.retired_pages)
                if r.remapped is not None:
                    item["remapped_rows"] = dict(zip(("corrected", "uncorrected", "pending", "failure"),
                                                     r.remapped))
                if r.nvlink_active is not None:
                    item["nvlink_active_links"] = r.nvlink_active
                if r.nvlink_errors:
                    item["nvlink_errors"] = {f"{link}/{e}": v for (link, e), v in sorted(r.nvlink_errors.items())}
                if r.pcie_replay is not None:
                    item["pcie_replay"] = r.pcie_replay
                counts = {str(code): n for (i, code), n in sorted(xid_counts.items()) if i == d.index}
                if counts:
                    code, ts = xid_last[d.index]
                    item["xid"] = {"counts": counts, "last": code, "last_timestamp": ts}
                out.append(item)
            return out
        except Exception:  # noqa: BLE001
            logger.debug("GPU snapshot failed", exc_info=True)
            return []
