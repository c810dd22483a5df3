"""GPU health from NVML, published through a prometheus_client custom Collector.

Runs inside vLLM processes, so it never raises into its caller, imports ``pynvml`` (nvidia-ml-py)
only in :meth:`GpuCollector.start`, and never changes a GPU setting: every NVML call only reads.
Where each part lives, with the NVML calls it makes and its error policy:

- this module: the collector facade (threads, lifecycle, scrape); NVML calls ``nvmlInit()`` (any
  failure: one INFO line, ``collector_up 0``) and ``nvmlShutdown()`` (failure logged at DEBUG).
- :mod:`vllm_otel.instrument.gpu_nvml`: every per-device read (count, handles, temperature, power,
  memory, utilisation, clocks and their event reasons, ECC, retired pages, remapped rows, NVLink,
  PCIe replays, per-process GPU memory for the process-to-GPU join on ``pid``) into plain
  dataclasses, each call guarded on its own: unsupported fields counted once and not asked again,
  other errors counted on every attempt in ``vllm_otel_gpu_collector_errors_total{field}``.
- :mod:`vllm_otel.instrument.gpu_xid`: the XID event thread (``nvmlEventSet*``,
  ``nvmlDeviceRegisterEvents``).
- :mod:`vllm_otel.instrument.gpu_metrics`: the ``vllm_otel_gpu_*`` families and JSON snapshots built
  from those readings (no NVML).

A process forked after ``start()`` reports ``collector_up 0`` and reads nothing: NVML state and
threads do not survive a fork, so call ``start()`` in the process that serves ``/metrics``.

Values are read by a background refresh thread every ``refresh_interval_s`` (default), so a scrape
never waits on NVML; ``refresh_interval_s=None`` reads at scrape time instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterator

from prometheus_client.core import Metric

from vllm_otel.instrument.gpu_metrics import (
    build_metrics, collector_up_family, metric_families, reading_to_dict)
from vllm_otel.instrument.gpu_nvml import GpuReading, NvmlReader
from vllm_otel.instrument.gpu_xid import XidWatcher

__all__ = ["GpuCollector"]

logger = logging.getLogger(__name__)


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
        self._nvml = nvml
        self._reader = NvmlReader(nvml, device_indices)
        self._enable_xid = enable_xid_thread
        self._interval = refresh_interval_s if refresh_interval_s and refresh_interval_s > 0 else None

        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._stop = threading.Event()
        self._xid = XidWatcher(self._reader, self._stop, xid_wait_ms)
        self._started = False
        self._stopped = False
        self._up = False
        self._pid = os.getpid()  # a forked copy must not use the parent's NVML state or threads
        self._readings: list[GpuReading] = []
        self._last_refresh: float | None = None
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
        self._reader.nvml = self._nvml
        try:
            self._reader.discover()
            if self._interval is not None:
                self._refresh_thread = threading.Thread(
                    target=self._refresh_loop, name="vllm-otel-gpu-refresh", daemon=True)
                self._refresh_thread.start()
            if self._enable_xid and self._reader.devices:
                self._xid_thread = threading.Thread(
                    target=self._xid.run, name="vllm-otel-gpu-xid", daemon=True)
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
            self._readings = self._reader.read_all()
            self._last_refresh = time.time()
        except Exception:  # noqa: BLE001
            logger.debug("GPU refresh failed", exc_info=True)
        finally:
            self._refresh_lock.release()

    # ------------------------------------------------------------------ export

    def describe(self) -> Iterator[Metric]:
        """Names only, so registering never touches NVML (and duplicates are detected)."""
        return iter(metric_families().values())

    def collect(self) -> Iterator[Metric]:
        try:
            if self.up and self._interval is None:
                self.refresh()
            metrics = self._build()
        except Exception:  # noqa: BLE001 - a scrape must not fail because of us
            logger.debug("GPU collect failed", exc_info=True)
            up = collector_up_family()
            up.add_metric([self.instance], 0.0)
            metrics = [up]
        return iter(metrics)

    def _build(self) -> list[Metric]:
        up = self.up
        if not up:
            return build_metrics(self.instance, self.engine, False, {}, None, [], {}, {},
                                 self._xid.device_by_index)
        xid_counts, xid_last = self._xid.state()
        return build_metrics(self.instance, self.engine, True, self._reader.errors(),
                             self._last_refresh, self._readings, xid_counts, xid_last,
                             self._xid.device_by_index)

    def snapshot(self) -> list[dict[str, Any]]:
        """The latest reading of every GPU as JSON-ready dicts (empty without NVML)."""
        try:
            if not self.up:
                return []
            xid_counts, xid_last = self._xid.state()
            return [reading_to_dict(r, xid_counts, xid_last) for r in self._readings]
        except Exception:  # noqa: BLE001
            logger.debug("GPU snapshot failed", exc_info=True)
            return []
