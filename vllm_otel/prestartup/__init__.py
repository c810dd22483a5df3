"""Pre-startup check: can vLLM start here with these settings? See :func:`run_checks`.

``python -m vllm_otel.prestartup_check`` and ``vllm-otel check`` are the command line;
``VLLM_MONITOR_PRESTARTUP_CHECK=true`` runs it before vLLM starts (general plugin, ``supervise``).
"""

from __future__ import annotations

import time
from typing import Any

from vllm_otel.prestartup import gpu as _gpu
from vllm_otel.prestartup import host as _host
from vllm_otel.prestartup import model as _model
from vllm_otel.prestartup.options import CheckOptions, options_from_vllm_argv
from vllm_otel.prestartup.report import CheckResult, Report

__all__ = ["CheckOptions", "CheckResult", "Report", "run_checks", "options_from_vllm_argv"]


def run_checks(opts: CheckOptions, *, nvml: Any = "auto", dtype_probe_code: str = _model.BF16_PROBE) -> Report:
    """Run every check; never raises for what it finds, nor when a check itself breaks (that check
    becomes a ``warn`` result saying so, the others still run).

    ``nvml``: the pynvml module to read GPUs through; "auto" loads the real one, None means no GPU.
    """
    t0 = time.monotonic()
    rep = Report()

    def safe(name: str, fn: Any, *args: Any, default: Any = None) -> Any:
        try:
            return fn(rep, *args)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            rep.add(name, "warn", f"the check itself failed: {type(e).__name__}: {e}",
                    "report this; the other checks are still valid")
            return default

    nv = _gpu.load_nvml() if nvml == "auto" else nvml
    gpus: list[_gpu.GpuInfo] = []
    cuda = None
    if nv is not None:
        try:
            gpus = _gpu.read_gpus(nv, opts.env.get("CUDA_VISIBLE_DEVICES"))
            cuda = _gpu.driver_cuda_version(nv)
        except Exception as e:  # noqa: BLE001 - a broken driver is a finding, not a crash
            rep.add("nvml", "error", f"NVML is present but cannot read the GPUs: {e}",
                    "check the driver (nvidia-smi); reboot after a driver update")
    platform = safe("platform", _host.check_platform, len(gpus), default="cpu")
    info = safe("model", _model.check_model_present, opts)
    dtype = _model.resolve_dtype(opts.dtype, info, platform)
    # The probe takes ~2 s (torch import): start it first, collect it last. Without a model,
    # "auto" names no dtype: nothing to probe.
    probe = None
    if platform == "cpu" and dtype == "bfloat16" and opts.probe_dtype and (info or opts.dtype != "auto"):
        probe = _model.start_dtype_probe(dtype_probe_code)
    try:
        safe("versions", _host.check_versions, cuda)
        safe("gpus", _gpu.check_gpus, gpus)
        avail = safe("host_memory", _host.check_host_memory, default=0)
        safe("shm", _host.check_shm, opts.tensor_parallel_size)
        safe("open_files", _host.check_open_files)
        safe("disk", _host.check_disk, opts)
        safe("port", _host.check_port, opts.host, opts.port)
        safe("nccl", _host.check_nccl, opts.env)
        safe("head_dtype", _model.check_head_and_dtype, info, platform, dtype)
        safe("tensor_parallel", _model.check_parallel, info, opts.tensor_parallel_size, gpus, platform)
        rep.memory = safe("memory", _model.check_memory, opts, info, dtype, platform, gpus, avail, default={})
    finally:
        if probe is not None:
            _model.finish_dtype_probe(rep, probe, dtype)
    rep.platform, rep.dtype = platform, dtype
    rep.duration_s = time.monotonic() - t0
    return rep
