"""Prometheus metric families (``vllm_otel_gpu_*``) and JSON snapshots from GPU readings.

Pure functions over :class:`~vllm_otel.instrument.gpu_nvml.GpuReading` and the XID counts: no NVML
call is made here, so :func:`metric_families` is also what ``describe()`` returns.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vllm_otel.instrument.gpu_nvml import GpuDevice, GpuReading

__all__ = ["GPU_LABELS", "PREFIX", "build_metrics", "collector_up_family", "metric_families",
           "reading_to_dict"]

PREFIX = "vllm_otel_gpu_"
GPU_LABELS = ["instance", "engine", "gpu", "uuid", "name"]

XidCounts = dict[tuple[int, int], int]  # (gpu index, xid code) -> events
XidLast = dict[int, tuple[int, float]]  # gpu index -> (xid code, unix time)


def collector_up_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        PREFIX + "collector_up", "1 when NVML is available and the GPU collector runs, else 0",
        labels=["instance"])


def metric_families() -> dict[str, Metric]:
    """Every family the GPU collector can export, empty, by key."""
    def gauge(name: str, doc: str, extra: Iterable[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(PREFIX + name, doc, labels=GPU_LABELS + list(extra))

    def counter(name: str, doc: str, extra: Iterable[str] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(PREFIX + name, doc, labels=GPU_LABELS + list(extra))

    return {
        "collector_up": collector_up_family(),
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


def build_metrics(
    instance: str,
    engine: str,
    up: bool,
    errors: dict[str, int],
    last_refresh: float | None,
    readings: list[GpuReading],
    xid_counts: XidCounts,
    xid_last: XidLast,
    device_by_index: Callable[[int], GpuDevice | None],
) -> list[Metric]:
    """The non-empty families for one scrape (only ``collector_up`` when NVML is not up)."""
    fams = metric_families()
    fams["collector_up"].add_metric([instance], 1.0 if up else 0.0)
    if not up:
        return [fams["collector_up"]]
    for fname, n in sorted(errors.items()):
        fams["collector_errors"].add_metric([instance, fname], float(n))
    if last_refresh is not None:
        fams["last_refresh"].add_metric([instance], last_refresh)
    for r in readings:
        labels = r.device.labels(instance, engine)
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
        dev = device_by_index(index)
        if dev is not None:
            fams["xid_errors"].add_metric(dev.labels(instance, engine) + [str(code)], float(n))
    for index, (code, ts) in sorted(xid_last.items()):
        dev = device_by_index(index)
        if dev is not None:
            labels = dev.labels(instance, engine)
            fams["last_xid"].add_metric(labels, float(code))
            fams["last_xid_timestamp"].add_metric(labels, ts)
    return [f for f in fams.values() if f.samples]


def reading_to_dict(r: GpuReading, xid_counts: XidCounts, xid_last: XidLast) -> dict[str, Any]:
    """One GPU's latest reading (and its XID events) as a JSON-ready dict."""
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
    return item
