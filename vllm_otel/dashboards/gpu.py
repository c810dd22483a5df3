"""Dashboard 4: GPU health from vllm-otel's NVML collector (``vllm_otel_gpu_*``), including the
reliability counters no public vLLM dashboard shows (XID, ECC, retired pages, row remapping,
NVLink, PCIe replays). Without a GPU only ``vllm_otel_gpu_collector_up 0`` exists."""

from __future__ import annotations

from typing import Any

from vllm_otel.dashboards.common import ANNOTATIONS, RI
from vllm_otel.dashboards.grafana import dashboard, query_variable, row, stat, table, target, timeseries

__all__ = ["UID", "build"]

UID = "vllm-otel-gpu"
G = 'job=~"$job", instance=~"$instance", gpu=~"$gpu"'
T = 'job=~"$job", instance=~"$instance"'
BY = "instance, gpu"
LG = "{{instance}} gpu{{gpu}}"


def _g(metric: str, agg: str = "max", by: str = BY, extra: str = "") -> str:
    return f"{agg} by ({by}) ({metric}{{{G}{', ' + extra if extra else ''}}})"


def _variables() -> list[dict[str, Any]]:
    v = "vllm_otel_gpu_collector_up"
    return [query_variable("job", "Job", f"label_values({v}, job)"),
            query_variable("instance", "Instance", f'label_values({v}{{job=~"$job"}}, instance)'),
            query_variable("gpu", "GPU", f'label_values(vllm_otel_gpu_temperature_celsius{{{T}}}, gpu)')]


def _overview() -> row:
    return row("Overview", [
        stat("Collector up", "1 where NVML is available and vllm-otel's GPU collector runs.",
             [target(f"min (vllm_otel_gpu_collector_up{{{T}}})")], "none", steps=[(None, "red"), (1, "green")]),
        stat("Hottest GPU", "Highest GPU temperature now.",
             [target(f"max (vllm_otel_gpu_temperature_celsius{{{G}}})")], "celsius",
             steps=[(None, "green"), (80, "orange"), (87, "red")]),
        stat("XID events (range)", "XID critical errors over the dashboard's range (any code).",
             [target(f"sum (increase(vllm_otel_gpu_xid_errors_total{{{G}}}[$__range]))")], "none",
             steps=[(None, "green"), (1, "red")]),
        stat("Uncorrectable ECC (range)", "Uncorrectable ECC errors since the driver load, over the range.",
             [target(f'sum (increase(vllm_otel_gpu_ecc_errors_volatile_total{{{G}, error_type="uncorrected"}}[$__range]))')],
             "none", steps=[(None, "green"), (1, "red")]),
        stat("Row-remap failures", "GPUs whose memory row remapping has failed (service the GPU).",
             [target(f"sum (vllm_otel_gpu_row_remap_failure{{{G}}})")], "none", steps=[(None, "green"), (1, "red")]),
        stat("Throttled GPUs", "GPUs with a thermal or power reason holding clocks down now.",
             [target(f'count (max by ({BY}) (vllm_otel_gpu_clocks_event_reasons{{{G}, '
                     f'reason=~".*(thermal|power|slowdown).*"}}) == 1) or vector(0)')], "none",
             steps=[(None, "green"), (1, "orange")]),
    ])


def _thermal_power() -> row:
    return row("Temperature, power and clocks", [
        timeseries("Temperature vs slowdown", "GPU temperature against the temperature at which the GPU "
                   "starts to slow itself down (NVML).",
                   [target(_g("vllm_otel_gpu_temperature_celsius"), LG),
                    target(_g("vllm_otel_gpu_slowdown_temperature_celsius"), "slowdown " + LG)],
                   "celsius", w=12),
        timeseries("Power vs limit", "Power draw against the enforced power limit.",
                   [target(_g("vllm_otel_gpu_power_watts"), LG),
                    target(_g("vllm_otel_gpu_power_limit_watts"), "limit " + LG)], "watt", w=12, min=0),
        timeseries("SM clock", "Current SM clock.", [target(_g("vllm_otel_gpu_sm_clock_hertz"), LG)], "hertz",
                   w=12, min=0),
        timeseries("Clock-event reasons", "1 for each reason holding clocks down (thermal, power cap, "
                   "hardware slowdown...).",
                   [target(_g("vllm_otel_gpu_clocks_event_reasons", by=f"{BY}, reason") + " == 1",
                           "{{reason}} " + LG)], "none", w=12, min=0, max=1, stack=True),
    ])


def _use() -> row:
    join = (f"max by (instance, pid) (vllm_otel_gpu_process_memory_bytes{{{G}}}) * on (instance, pid) "
            f"group_left (role) max by (instance, pid, role) (vllm_otel_process_resident_memory_bytes{{{T}}} * 0 + 1)")
    return row("Utilisation and memory", [
        timeseries("Utilisation", "Fraction of the sample period a kernel was running, and of device "
                   "memory being read or written.",
                   [target(_g("vllm_otel_gpu_utilization_ratio"), "kernel " + LG),
                    target(_g("vllm_otel_gpu_memory_utilization_ratio"), "memory bus " + LG)],
                   "percentunit", w=8, min=0, max=1),
        timeseries("Device memory", "Device memory in use (all processes) against its size.",
                   [target(_g("vllm_otel_gpu_memory_used_bytes"), "used " + LG),
                    target(_g("vllm_otel_gpu_memory_total_bytes"), "total " + LG)], "bytes", w=8, min=0),
        timeseries("Memory per vLLM process", "Device memory of each process, joined on pid to the vLLM "
                   "process role (worker, engine core).",
                   [target(join, "{{role}} {{pid}}")], "bytes", w=8, min=0, stack=True),
    ])


def _reliability() -> row:
    return row("Reliability", [
        timeseries("XID events by code", "XID critical error events per code (e.g. 79 fallen off the "
                   "bus, 48 double-bit ECC, 63/64 row remapping).",
                   [target(f"sum by ({BY}, xid) (increase(vllm_otel_gpu_xid_errors_total{{{G}}}[{RI}]))",
                           "xid {{xid}} " + LG)], "none", w=8, min=0, bars=True),
        timeseries("ECC errors", "Corrected and uncorrected ECC errors per rate interval (volatile: since "
                   "the driver load).",
                   [target(f"sum by ({BY}, error_type) (increase(vllm_otel_gpu_ecc_errors_volatile_total{{{G}}}[{RI}]))",
                           "{{error_type}} " + LG)], "none", w=8, min=0),
        table("Lifetime memory health", "Aggregate ECC errors, retired pages, remapped rows and pending/failed "
              "remaps per GPU.",
              [target(_g("vllm_otel_gpu_ecc_errors_aggregate_total", "sum", f"{BY}, error_type"),
                      instant=True, table=True),
               target(_g("vllm_otel_gpu_retired_pages", "sum", f"{BY}, cause"), instant=True, table=True),
               target(_g("vllm_otel_gpu_remapped_rows", "sum", f"{BY}, error_type"), instant=True, table=True),
               target(_g("vllm_otel_gpu_row_remap_pending"), instant=True, table=True),
               target(_g("vllm_otel_gpu_row_remap_failure"), instant=True, table=True)], "none", w=8),
        timeseries("NVLink errors", "NVLink data-link errors per rate interval, by link and type.",
                   [target(f"sum by ({BY}, link, error_type) (increase(vllm_otel_gpu_nvlink_errors_total{{{G}}}[{RI}]))",
                           "link {{link}} {{error_type}} " + LG)], "none", w=8, min=0),
        timeseries("NVLink active links", "NVLink links currently active.",
                   [target(_g("vllm_otel_gpu_nvlink_active_links"), LG)], "none", w=8, min=0),
        timeseries("PCIe replays", "PCIe replays per rate interval: a failing link or riser.",
                   [target(f"sum by ({BY}) (increase(vllm_otel_gpu_pcie_replay_total{{{G}}}[{RI}]))", LG)],
                   "none", w=8, min=0),
    ])


def build() -> dict[str, Any]:
    return dashboard(UID, "vLLM GPU health", "GPU temperature, power, clocks, utilisation, memory and "
                     "reliability counters from vllm-otel's NVML collector.", ["vllm", "gpu"], _variables(),
                     [_overview(), _thermal_power(), _use(), _reliability()], ANNOTATIONS)
