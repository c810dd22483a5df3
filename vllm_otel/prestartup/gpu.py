"""GPU checks through NVML (``pynvml``, from nvidia-ml-py): devices, free memory, ECC, retired
pages, pending row remaps, temperature. Read-only: no clocks, modes or persistence are changed.

Every NVML call may raise (a query a GPU does not support raises NVMLError_NotSupported); such a
reading is left out, never fatal. Tests pass a fake module as ``nvml`` (no GPU on CI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_otel.prestartup.report import Report

__all__ = ["GpuInfo", "load_nvml", "read_gpus", "check_gpus"]


@dataclass
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    problems: list[str] = field(default_factory=list)   # errors: the GPU should not be used
    warnings: list[str] = field(default_factory=list)
    temperature_c: int | None = None


def load_nvml() -> Any | None:
    """The initialised pynvml module, or None (no driver, no library, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - any failure means: no usable NVML here
        return None


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - not supported on this GPU
        return None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def driver_cuda_version(nvml: Any) -> str | None:
    v = _try(nvml.nvmlSystemGetCudaDriverVersion)
    return f"{v // 1000}.{(v % 1000) // 10}" if isinstance(v, int) else None


def read_gpus(nvml: Any, visible: str | None = None) -> list[GpuInfo]:
    """Every device NVML sees (restricted to CUDA_VISIBLE_DEVICES indices when set)."""
    count = nvml.nvmlDeviceGetCount()
    indices = list(range(count))
    if visible is not None and visible.strip() != "":
        want = [v.strip() for v in visible.split(",") if v.strip()]
        if all(w.isdigit() for w in want):
            indices = [int(w) for w in want if int(w) < count]
    elif visible is not None:
        indices = []  # CUDA_VISIBLE_DEVICES="" hides every GPU
    out = []
    for i in indices:
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        g = GpuInfo(i, _text(_try(nvml.nvmlDeviceGetName, h) or "GPU"), int(mem.total), int(mem.free))
        ecc = _try(nvml.nvmlDeviceGetTotalEccErrors, h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                   nvml.NVML_VOLATILE_ECC)
        if ecc:
            g.problems.append(f"{ecc} uncorrected ECC errors since the driver loaded")
        if _try(nvml.nvmlDeviceGetRetiredPagesPendingStatus, h) == nvml.NVML_FEATURE_ENABLED:
            g.problems.append("retired memory pages pending: reset the GPU before use")
        remap = _try(nvml.nvmlDeviceGetRemappedRows, h)  # (corrected, uncorrected, pending, failure)
        if remap:
            if remap[3]:
                g.problems.append("row remapping failed: the GPU needs service")
            elif remap[2]:
                g.problems.append("row remap pending: reset the GPU before use")
        temp = _try(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
        if isinstance(temp, int):
            g.temperature_c = temp
            slow = _try(nvml.nvmlDeviceGetTemperatureThreshold, h, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            if isinstance(slow, int) and temp >= slow - 5:
                g.warnings.append(f"{temp} C, within 5 C of its slowdown threshold {slow} C")
        out.append(g)
    return out


def check_gpus(rep: Report, gpus: list[GpuInfo]) -> None:
    if not gpus:
        return
    for g in gpus:
        what = f"GPU {g.index} {g.name}: {g.free_bytes / 1024 ** 3:.1f} of {g.total_bytes / 1024 ** 3:.1f} GiB free"
        if g.temperature_c is not None:
            what += f", {g.temperature_c} C"
        if g.problems:
            rep.add(f"gpu{g.index}", "error", what + "; " + "; ".join(g.problems),
                    "leave this GPU out (CUDA_VISIBLE_DEVICES) until it is reset or serviced",
                    free_bytes=g.free_bytes, total_bytes=g.total_bytes)
        elif g.warnings:
            rep.add(f"gpu{g.index}", "warn", what + "; " + "; ".join(g.warnings),
                    "check cooling and airflow; a hot GPU slows down", free_bytes=g.free_bytes,
                    total_bytes=g.total_bytes)
        else:
            rep.add(f"gpu{g.index}", "ok", what, free_bytes=g.free_bytes, total_bytes=g.total_bytes)
