"""Health of vLLM's processes and of the host they share, as a prometheus_client custom Collector.

Read at scrape time from ``/proc`` through psutil (a few small file reads per process), so there is
no thread to manage. Runs inside vLLM: nothing here raises into the caller, and a process that exits
between being listed and being read is skipped silently.

Process roles come from the titles vLLM sets with setproctitle (``<prefix>::<Name>``, prefix
``VLLM_PROCESS_NAME_PREFIX``, default ``VLLM``): ``EngineCore[_DPn]`` -> ``engine_core``,
``Worker[_TPn...]`` -> ``worker``, ``APIServer_*`` -> ``api_server``, ``DPCoordinator`` ->
``dp_coordinator``, anything else -> ``child``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["ProcessCollector", "default_pids_provider", "role_from_title"]

logger = logging.getLogger(__name__)

PidsProvider = Callable[[], Mapping[str, Sequence[int]]]

_TITLE_ROLES = [
    (re.compile(r"(?:^|::)EngineCore(?:_|\b)"), "engine_core"),
    (re.compile(r"(?:^|::)Worker(?:_|\b)"), "worker"),
    (re.compile(r"(?:^|::)APIServer(?:_|\b)"), "api_server"),
    (re.compile(r"(?:^|::)DPCoordinator\b"), "dp_coordinator"),
]


_RANK = {k: re.compile(rf"_{k.upper()}(\d+)") for k in ("dp", "pp", "tp")}


def ranks_from_title(title: str) -> dict[str, str]:
    """Parallel ranks a vLLM worker puts in its title (``VLLM::Worker_DP1_PP0_TP3``); "" if absent.

    vLLM names workers ``Worker[_DP<r>][_PP<r>][_TP<r>]...`` (only the dimensions that are > 1),
    so a single-GPU worker has no rank labels and a TP=2 worker gets ``tp_rank``.
    """
    out = {}
    for k, rx in _RANK.items():
        m = rx.search(title)
        out[f"{k}_rank"] = m.group(1) if m else ""
    return out


def role_from_title(title: str) -> str | None:
    """The role for a vLLM process title (``VLLM::EngineCore`` -> ``engine_core``), else None."""
    for pattern, role in _TITLE_ROLES:
        if pattern.search(title):
            return role
    return None


def _title(proc: psutil.Process) -> str:
    """The setproctitle title: it rewrites argv, so cmdline shows it (comm is cut to 15 chars)."""
    try:
        title = " ".join(arg for arg in proc.cmdline() if arg)  # setproctitle pads with empty args
        if title:
            return title
    except (psutil.Error, OSError):
        pass
    try:
        return proc.name()
    except (psutil.Error, OSError):
        return ""


def default_pids_provider() -> dict[str, list[int]]:
    """The current process (by its title, else ``api_server``) and all its descendants by title."""
    me = psutil.Process()
    roles: dict[str, list[int]] = {role_from_title(_title(me)) or "api_server": [me.pid]}
    try:
        children = me.children(recursive=True)
    except (psutil.Error, OSError):
        children = []
    for child in children:
        role = role_from_title(_title(child)) or "child"
        roles.setdefault(role, []).append(child.pid)
    return roles


class ProcessCollector:
    """Per-process (``vllm_otel_process_*``) and host (``vllm_otel_host_*``) health metrics.

    ``pids_provider`` returns ``{role: [pid, ...]}``; the default is :func:`default_pids_provider`.
    """

    def __init__(
        self,
        instance: str,
        pids_provider: PidsProvider | None = None,
        registry: Any = None,
        shm_path: str = "/dev/shm",
    ) -> None:
        self.instance = str(instance)
        self._provider = pids_provider or default_pids_provider
        self._shm_path = shm_path
        self._provider_failed = False
        if registry is not None:
            try:
                registry.register(self)
            except Exception:  # noqa: BLE001 - e.g. a duplicate; never fail vLLM for metrics
                logger.warning("vllm-otel: could not register the process collector", exc_info=True)

    # ------------------------------------------------------------------ reading

    def _pids(self) -> list[tuple[str, int]]:
        try:
            mapping = self._provider() or {}
            pairs = [(str(role), int(pid)) for role, pids in mapping.items() for pid in pids]
            self._provider_failed = False
            return pairs
        except Exception:  # noqa: BLE001
            (logger.debug if self._provider_failed else logger.warning)(
                "vllm-otel: listing vLLM processes failed", exc_info=True)
            self._provider_failed = True
            return []

    @staticmethod
    def _read_process(pid: int) -> dict[str, float] | None:
        """One process's numbers, or None when it is gone (or not ours to read)."""
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                mem = proc.memory_info()
                cpu = proc.cpu_times()
                values = {
                    "resident_memory_bytes": float(mem.rss),
                    "virtual_memory_bytes": float(mem.vms),
                    "cpu_seconds": float(cpu.user + cpu.system),
                    "threads": float(proc.num_threads()),
                }
                try:
                    values["open_fds"] = float(proc.num_fds())
                except (AttributeError, psutil.AccessDenied):  # num_fds is POSIX-only
                    pass
                return values
        except psutil.NoSuchProcess:  # includes ZombieProcess: exited between listing and reading
            return None
        except (psutil.Error, OSError):
            logger.debug("cannot read process %s", pid, exc_info=True)
            return None

    def _read_host(self) -> dict[str, float]:
        host: dict[str, float] = {}
        try:
            st = os.statvfs(self._shm_path)
            total = st.f_blocks * st.f_frsize
            host["shm_total_bytes"] = float(total)
            host["shm_used_bytes"] = float(total - st.f_bfree * st.f_frsize)
        except (OSError, AttributeError):  # no /dev/shm (or no statvfs on this OS): skip
            pass
        try:
            vm = psutil.virtual_memory()
            host["memory_available_bytes"] = float(vm.available)
            host["memory_total_bytes"] = float(vm.total)
        except Exception:  # noqa: BLE001
            logger.debug("virtual_memory failed", exc_info=True)
        try:
            load1, load5, load15 = os.getloadavg()
            host.update(load1=load1, load5=load5, load15=load15)
        except (OSError, AttributeError):
            pass
        count = os.cpu_count()
        if count:
            host["cpu_count"] = float(count)
        return host

    def _read(self) -> tuple[list[dict[str, Any]], dict[str, float]]:
        procs = []
        seen: set[int] = set()
        for role, pid in self._pids():
            if pid in seen:
                continue
            seen.add(pid)
            values = self._read_process(pid)
            if values is not None:
                try:
                    ranks = ranks_from_title(_title(psutil.Process(pid)))
                except (psutil.Error, OSError):
                    ranks = ranks_from_title("")
                procs.append({"role": role, "pid": pid, **ranks, **values})
        return procs, self._read_host()

    # ------------------------------------------------------------------ export

    def _families(self) -> dict[str, Metric]:
        pl = ["instance", "role", "pid", "dp_rank", "pp_rank", "tp_rank"]

        def host(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily("vllm_otel_host_" + name, doc, labels=["instance"])

        return {
            "resident_memory_bytes": GaugeMetricFamily(
                "vllm_otel_process_resident_memory_bytes", "Resident memory of a vLLM process", labels=pl),
            "virtual_memory_bytes": GaugeMetricFamily(
                "vllm_otel_process_virtual_memory_bytes", "Virtual memory of a vLLM process", labels=pl),
            "cpu_seconds": CounterMetricFamily(
                "vllm_otel_process_cpu_seconds", "User plus system CPU time of a vLLM process", labels=pl),
            "open_fds": GaugeMetricFamily(
                "vllm_otel_process_open_fds", "Open file descriptors of a vLLM process", labels=pl),
            "threads": GaugeMetricFamily(
                "vllm_otel_process_threads", "Threads of a vLLM process", labels=pl),
            "count": GaugeMetricFamily(
                "vllm_otel_process_count", "vLLM processes alive, by role", labels=["instance", "role"]),
            "shm_used_bytes": host("shm_used_bytes", "Bytes used on /dev/shm"),
            "shm_total_bytes": host("shm_total_bytes", "Size of /dev/shm"),
            "memory_available_bytes": host("memory_available_bytes", "Host memory available"),
            "memory_total_bytes": host("memory_total_bytes", "Host memory installed"),
            "load1": host("load1", "1-minute load average"),
            "load5": host("load5", "5-minute load average"),
            "load15": host("load15", "15-minute load average"),
            "cpu_count": host("cpu_count", "Logical CPUs of the host"),
        }

    def describe(self) -> Iterator[Metric]:
        """Names only, so registering reads nothing (and duplicates are detected)."""
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        try:
            procs, host = self._read()
            fams = self._families()
            counts: dict[str, int] = {}
            for p in procs:
                labels = [self.instance, p["role"], str(p["pid"]), p.get("dp_rank", ""),
                          p.get("pp_rank", ""), p.get("tp_rank", "")]
                counts[p["role"]] = counts.get(p["role"], 0) + 1
                for key in ("resident_memory_bytes", "virtual_memory_bytes", "cpu_seconds",
                            "open_fds", "threads"):
                    if key in p:
                        fams[key].add_metric(labels, p[key])
            for role, n in sorted(counts.items()):
                fams["count"].add_metric([self.instance, role], float(n))
            for key, value in host.items():
                fams[key].add_metric([self.instance], value)
            return iter([f for f in fams.values() if f.samples])
        except Exception:  # noqa: BLE001 - a scrape must not fail because of us
            logger.debug("process collect failed", exc_info=True)
            return iter(())

    def snapshot(self) -> dict[str, Any]:
        """``{"instance", "processes": [{role, pid, ...}], "host": {...}}`` for a JSON status page."""
        try:
            procs, host = self._read()
        except Exception:  # noqa: BLE001
            logger.debug("process snapshot failed", exc_info=True)
            procs, host = [], {}
        return {"instance": self.instance, "processes": procs, "host": host}
