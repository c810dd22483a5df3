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
    """Run every check; never raises for what it finds (a failing check becomes an ``error`` result).

    ``nvml``: the pynvml module to read GPUs through; "auto" loads the real one, None means no GPU.
    """
    t0 = time.monotonic()
    rep = Report()
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
    platform = _host.check_platform(rep, len(gpus))
    # The probe takes ~2 s (torch import): start it first, collect it last.
    info = _model.check_model_present(rep, opts)
    dtype = _model.resolve_dtype(opts.dtype, info, platform)
    probe = None
    # Without a model, "auto" names no dtype: nothing to probe.
    known = info is not None or opts.dtype != "auto"
    if platform == "cpu" and dtype == "bfloat16" and opts.probe_dtype and known:
        probe = _model.start_dtype_probe(dtype_probe_code)
    try:
        _host.check_versions(rep, cuda)
        _gpu.check_gpus(rep, gpus)
        avail = _host.check_host_memory(rep)
        _host.check_shm(rep, opts.tensor_parallel_size)
        _host.check_open_files(rep)
        _host.check_disk(rep, opts)
        _host.check_port(rep, opts.host, opts.port)
        _host.check_nccl(rep, opts.env)
        _model.check_head_and_dtype(rep, info, platform, dtype)
        _model.check_parallel(rep, info, opts.tensor_parallel_size, gpus, platform)
        rep.memory = _model.check_memory(rep, opts, info, dtype, platform, gpus, avail)
    finally:
        if probe is not None:
            _model.finish_dtype_probe(rep, probe, dtype)
    rep.platform, rep.dtype = platform, dtype
    rep.duration_s = time.monotonic() - t0
    return rep
