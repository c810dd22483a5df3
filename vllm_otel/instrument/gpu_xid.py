"""XID critical-error events from NVML, watched on a thread and counted per GPU and code.

Used by :class:`vllm_otel.instrument.gpu.GpuCollector`; reads through the same
:class:`~vllm_otel.instrument.gpu_nvml.NvmlReader` (its devices, constants and error counts).

NVML calls made here: ``nvmlEventSetCreate()``, ``nvmlDeviceRegisterEvents(h,
nvmlEventTypeXidCriticalError, set)``, ``nvmlEventSetWait_v2(set, timeout_ms)`` (falling back to
``nvmlEventSetWait``; ``NVMLError_Timeout`` means "no event"), ``nvmlEventSetFree(set)``, and
``nvmlDeviceGetUUID(h)`` to match an event's device to a watched GPU.

Errors: each failure is counted in ``vllm_otel_gpu_collector_errors_total{field}`` under
``xid_event_set`` (no event set: nothing watched), ``xid_register`` (per GPU), ``xid_wait`` (then
one second's pause, so a broken event set does not spin) or ``xid_event`` (a bad event).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vllm_otel.instrument.gpu_nvml import MISSING, GpuDevice, NvmlReader, handle_key, nvml_text

__all__ = ["XidWatcher"]

logger = logging.getLogger(__name__)


class XidWatcher:
    """Counts XID events per (GPU index, code) and keeps the last one per GPU."""

    def __init__(self, reader: NvmlReader, stop: threading.Event, wait_ms: int = 500) -> None:
        self._reader = reader
        self._stop = stop
        self._wait_ms = int(wait_ms)
        self._lock = threading.Lock()  # guards the counts below (written here, read by scrapes)
        self._counts: dict[tuple[int, int], int] = {}
        self._last: dict[int, tuple[int, float]] = {}
        self._unknown: dict[int, GpuDevice] = {}  # XID events seen on a device we do not watch

    def state(self) -> tuple[dict[tuple[int, int], int], dict[int, tuple[int, float]]]:
        """Copies of (counts by (gpu, code), last (code, unix time) by gpu)."""
        with self._lock:
            return dict(self._counts), dict(self._last)

    def device_by_index(self, index: int) -> GpuDevice | None:
        return self._reader.devices.get(index) or self._unknown.get(index)

    def run(self) -> None:
        """The thread body: register every held GPU, then wait for events until ``stop`` is set."""
        reader = self._reader
        nv = reader.nvml
        try:
            event_set = nv.nvmlEventSetCreate()
        except Exception:  # noqa: BLE001
            reader.count_error("xid_event_set")
            logger.debug("nvmlEventSetCreate failed; XID events not watched", exc_info=True)
            return
        try:
            xid_type = reader.const("nvmlEventTypeXidCriticalError")
            watched = 0
            for dev in list(reader.devices.values()):
                try:
                    nv.nvmlDeviceRegisterEvents(dev.handle, xid_type, event_set)
                    watched += 1
                except Exception:  # noqa: BLE001
                    reader.count_error("xid_register")
                    logger.debug("GPU %s: XID events not available", dev.index, exc_info=True)
            if not watched:
                return
            wait = getattr(nv, "nvmlEventSetWait_v2", None) or getattr(nv, "nvmlEventSetWait")
            timeout_cls = getattr(nv, "NVMLError_Timeout", None)
            while not self._stop.is_set():
                try:
                    data = wait(event_set, self._wait_ms)
                except Exception as exc:  # noqa: BLE001
                    if isinstance(timeout_cls, type) and isinstance(exc, timeout_cls):
                        continue
                    reader.count_error("xid_wait")
                    logger.debug("nvmlEventSetWait failed", exc_info=True)
                    self._stop.wait(1.0)  # do not spin on a broken event set
                    continue
                try:
                    self._record_event(data)
                except Exception:  # noqa: BLE001
                    reader.count_error("xid_event")
                    logger.debug("bad NVML event", exc_info=True)
        except Exception:  # noqa: BLE001
            reader.count_error("xid_event")
            logger.debug("XID thread failed", exc_info=True)
        finally:
            try:
                nv.nvmlEventSetFree(event_set)
            except Exception:  # noqa: BLE001
                logger.debug("nvmlEventSetFree failed", exc_info=True)

    def _device_for_event(self, handle: Any) -> GpuDevice:
        devices = self._reader.devices
        key = handle_key(handle)
        for dev in devices.values():
            if dev.handle is handle or handle_key(dev.handle) == key:
                return dev
        uuid = self._reader.call(-1, "xid_event", "nvmlDeviceGetUUID", handle)
        if uuid is not MISSING:
            for dev in devices.values():
                if dev.uuid == nvml_text(uuid):
                    return dev
        return self._unknown.setdefault(-1, GpuDevice(index=-1, handle=None, uuid="", name=""))

    def _record_event(self, data: Any) -> None:
        xid_type = int(self._reader.const("nvmlEventTypeXidCriticalError"))
        event_type = int(getattr(data, "eventType", xid_type))
        if not event_type & xid_type:
            return
        code = int(data.eventData)
        dev = self._device_for_event(getattr(data, "device", None))
        now = time.time()
        with self._lock:
            key = (dev.index, code)
            self._counts[key] = self._counts.get(key, 0) + 1
            self._last[dev.index] = (code, now)
        logger.warning("GPU %s (%s) reported XID %d", dev.index, dev.uuid, code)
