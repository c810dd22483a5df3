"""Dashboard 1: vLLM serving, per job, model, instance and engine."""

from __future__ import annotations

from typing import Any

from vllm_otel.dashboards.common import ANNOTATIONS, RI, SEL, SEL_ENGINE, SEL_TARGET, SERVING_VARIABLES, quantiles
from vllm_otel.dashboards.grafana import (bargauge, dashboard, heatmap, row, stat, state_timeline, table,
                                          target, timeseries)

__all__ = ["UID", "build"]

UID = "vllm-otel-serving"


def _rate(metric: str, sel: str = SEL, by: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({metric}{{{sel}}}[{RI}]))"


def _latency(title: str, metric: str, what: str) -> dict[str, Any]:
    return timeseries(title, f"{what}: p50, p95 and p99 from vLLM's histogram `{metric}`, and the mean.",
                      [target(e, lg) for e, lg in quantiles(metric, SEL)], "s", w=8, min=0)


def _stats() -> row:
    ttft95 = quantiles("vllm:time_to_first_token_seconds", SEL)[1][0]
    e2e95 = quantiles("vllm:e2e_request_latency_seconds", SEL)[1][0]
    return row("Overview", [
        stat("Requests / s", "Finished requests per second (all finish reasons).",
             [target(_rate("vllm:request_success_total"))], "reqps", decimals=2),
        stat("Running", "Requests in vLLM's running batch now.",
             [target(f"sum (vllm:num_requests_running{{{SEL}}})")], "none"),
        stat("Waiting", "Requests waiting in vLLM's scheduler queue now.",
             [target(f"sum (vllm:num_requests_waiting{{{SEL}}})")], "none",
             steps=[(None, "green"), (1, "orange"), (20, "red")]),
        stat("KV cache used", "Highest KV-cache usage among the selected engines.",
             [target(f"max (vllm:kv_cache_usage_perc{{{SEL}}})")], "percentunit",
             steps=[(None, "green"), (0.8, "orange"), (0.9, "red")]),
        stat("TTFT p95", "95th percentile of time to first token over the rate interval.",
             [target(ttft95)], "s", steps=[(None, "green"), (1, "orange"), (5, "red")]),
        stat("End-to-end p95", "95th percentile of request latency (arrival to last token).",
             [target(e2e95)], "s"),
        stat("Stalled engines", "Engines with requests in flight and no token for the stall timeout "
             "(vllm-otel watchdog); vLLM's /health stays 200 through such hangs.",
             [target(f"sum (vllm_otel_engine_stalled{{{SEL}}})")], "none",
             steps=[(None, "green"), (1, "red")]),
        stat("Error share", "Share of finished requests that ended in abort or error over the rate "
             "interval.",
             [target(f'(sum (rate(vllm:request_success_total{{{SEL}, finished_reason=~"abort|error"}}[{RI}])) '
                     f"or vector(0)) / sum (rate(vllm:request_success_total{{{SEL}}}[{RI}]))")],
             "percentunit", steps=[(None, "green"), (0.01, "orange"), (0.05, "red")]),
        stat("Prefix cache hit rate", "Prefix-cache hits / queries (tokens) over the rate interval.",
             [target(f"{_rate('vllm:prefix_cache_hits_total')} / {_rate('vllm:prefix_cache_queries_total')}")],
             "percentunit"),
        stat("Generation tokens / s", "Output tokens produced per second.",
             [target(_rate("vllm:generation_tokens_total"))], "short"),
        stat("Engines up", "Engines able to take requests: lifecycle state ready, idle, serving, saturated "
             "or preempting (vllm-otel lifecycle).",
             [target(f'count (vllm_otel_lifecycle_state{{{SEL_ENGINE}, '
                     f'state=~"ready|idle|serving|saturated|preempting"}} == 1) or vector(0)')],
             "none", steps=[(None, "red"), (1, "green")]),
        stat("Preemptions / min", "Requests preempted per minute (KV cache oversubscribed).",
             [target(f"60 * {_rate('vllm:num_preemptions_total')}")], "none",
             steps=[(None, "green"), (1, "orange"), (5, "red")]),
    ])


def _health() -> row:
    return row("Health", [
        state_timeline("Lifecycle state", "The vllm-otel lifecycle state of each engine (26 states from "
                       "start-up to crash).",
                       [target(f"max by (instance, engine, state) (vllm_otel_lifecycle_state{{{SEL_ENGINE}}}) == 1",
                               "{{instance}} e{{engine}} {{state}}")], w=12, h=8),
        timeseries("Stalled", "1 while requests are in flight and no token was produced for the stall "
                   "timeout.",
                   [target(f"max by (instance, engine) (vllm_otel_engine_stalled{{{SEL}}})",
                           "{{instance}} e{{engine}}")], "none", w=4, min=0, max=1),
        timeseries("Time since last progress", "Seconds since each engine produced its last token "
                   "(grows while idle too: read it with Running).",
                   [target(f"time() - max by (instance, engine) "
                           f"(vllm_otel_engine_last_progress_timestamp_seconds{{{SEL}}})",
                           "{{instance}} e{{engine}}")], "s", w=4, min=0),
        timeseries("Aborts / s", "Aborted requests (client disconnects included), from vllm-otel's "
                   "counter.",
                   [target(_rate("vllm_otel_requests_aborted_total", by="instance"), "{{instance}}")],
                   "reqps", w=4, min=0),
    ])


def _latency_row() -> row:
    phases = [(f"sum (rate(vllm:{m}_sum{{{SEL}}}[{RI}])) / sum (rate(vllm:{m}_count{{{SEL}}}[{RI}]))", lg)
              for m, lg in (("request_queue_time_seconds", "queue"),
                            ("request_prefill_time_seconds", "prefill"),
                            ("request_decode_time_seconds", "decode"))]
    return row("Latency", [
        _latency("Time to first token", "vllm:time_to_first_token_seconds", "Arrival to first output token"),
        _latency("Inter-token latency", "vllm:inter_token_latency_seconds", "Time between output tokens"),
        _latency("Time per output token", "vllm:request_time_per_output_token_seconds",
                 "Per request: decode time / output tokens"),
        _latency("End-to-end latency", "vllm:e2e_request_latency_seconds", "Arrival to last token"),
        _latency("Queue time", "vllm:request_queue_time_seconds", "Time waiting before the first schedule"),
        timeseries("Request phases (mean)", "Mean time a request spends queued, in prefill and in "
                   "decode (stacked).", [target(e, lg) for e, lg in phases], "s", w=8, stack=True, min=0),
        heatmap("TTFT distribution", "Time to first token, requests per bucket.",
                [target(f"sum by (le) (increase(vllm:time_to_first_token_seconds_bucket{{{SEL}}}[{RI}]))",
                        "{{le}}", heatmap=True)], "s"),
        heatmap("End-to-end distribution", "Request latency, requests per bucket.",
                [target(f"sum by (le) (increase(vllm:e2e_request_latency_seconds_bucket{{{SEL}}}[{RI}]))",
                        "{{le}}", heatmap=True)], "s"),
    ])


def _throughput() -> row:
    return row("Throughput", [
        timeseries("Requests / s by finish reason", "Finished requests per second by vLLM's finish "
                   "reason (stop, length, abort, error).",
                   [target(_rate("vllm:request_success_total", by="finished_reason"), "{{finished_reason}}")],
                   "reqps", w=8, stack=True, min=0),
        timeseries("Tokens / s", "Prompt tokens prefilled and output tokens generated per second.",
                   [target(_rate("vllm:prompt_tokens_total"), "prompt"),
                    target(_rate("vllm:generation_tokens_total"), "generation")], "short", w=8, min=0),
        timeseries("Tokens per request (mean)", "Mean prompt and output length of finished requests.",
                   [target(f"{_rate('vllm:request_prompt_tokens_sum')} / {_rate('vllm:request_prompt_tokens_count')}",
                           "prompt"),
                    target(f"{_rate('vllm:request_generation_tokens_sum')} / "
                           f"{_rate('vllm:request_generation_tokens_count')}", "generation")], "short", w=8,
                   min=0),
    ])


def _saturation() -> row:
    return row("Saturation", [
        timeseries("Running and waiting", "Requests in the running batch and in the queue.",
                   [target(f"sum by (instance) (vllm:num_requests_running{{{SEL}}})", "running {{instance}}"),
                    target(f"sum by (instance) (vllm:num_requests_waiting{{{SEL}}})", "waiting {{instance}}")],
                   "none", w=8, min=0),
        timeseries("KV cache usage", "Fraction of the KV cache in use per engine; the alert "
                   "VllmKvCacheNearlyFull fires above 0.9.",
                   [target(f"max by (instance, engine) (vllm:kv_cache_usage_perc{{{SEL}}})",
                           "{{instance}} e{{engine}}")], "percentunit", w=8, min=0, max=1, threshold=0.9),
        timeseries("KV headroom", "Free KV cache in tokens (vllm-otel).",
                   [target(f"sum by (instance, engine) (vllm_otel_kv_cache_headroom_tokens{{{SEL}}})",
                           "{{instance}} e{{engine}}")], "short", w=8, min=0),
        timeseries("Preemptions / s", "Requests preempted per second: their KV cache is dropped and "
                   "recomputed.", [target(_rate("vllm:num_preemptions_total", by="instance"), "{{instance}}")],
                   "ops", w=8, min=0),
        timeseries("Waiting by reason", "Queued requests by the reason vLLM gives (capacity, ...).",
                   [target(f"sum by (reason) (vllm:num_requests_waiting_by_reason{{{SEL}}})", "{{reason}}")],
                   "none", w=8, min=0, stack=True),
        timeseries("Prefix cache hit rate", "Prefix-cache hits / queries (tokens) per instance, from "
                   "the counters.",
                   [target(f"{_rate('vllm:prefix_cache_hits_total', by='instance')} / "
                           f"{_rate('vllm:prefix_cache_queries_total', by='instance')}", "{{instance}}")],
                   "percentunit", w=8, min=0, max=1),
    ])


def _per_instance() -> row:
    by = "instance, model_name"
    cols = [
        (f"sum by ({by}) (vllm:num_requests_running{{{SEL}}})", "Running"),
        (f"sum by ({by}) (vllm:num_requests_waiting{{{SEL}}})", "Waiting"),
        (f"max by ({by}) (vllm:kv_cache_usage_perc{{{SEL}}})", "KV used"),
        (_rate("vllm:request_success_total", by=by), "Requests/s"),
        (quantiles("vllm:time_to_first_token_seconds", SEL, by=by)[1][0], "TTFT p95"),
    ]
    return row("Per instance", [
        table("Instances", "One line per instance and model: load, KV use, throughput and TTFT p95 now.",
              [target(e, lg, instant=True, table=True) for e, lg in cols], "none",
              organize={"excludeByName": {"Time": True},
                        "renameByName": {f"Value #{chr(65 + i)}": lg for i, (_, lg) in enumerate(cols)}}),
    ])


def _processes() -> row:
    return row("Processes", collapsed=True, panels=[
        timeseries("Resident memory", "RSS of each vLLM process (API server, engine core, workers).",
                   [target(f"sum by (instance, role, pid) (vllm_otel_process_resident_memory_bytes{{{SEL_TARGET}}})",
                           "{{role}} {{pid}}")], "bytes", w=8, min=0),
        timeseries("CPU", "CPU seconds per second of each vLLM process.",
                   [target(f"sum by (instance, role, pid) (rate(vllm_otel_process_cpu_seconds_total{{{SEL_TARGET}}}[{RI}]))",
                           "{{role}} {{pid}}")], "percentunit", w=8, min=0),
        timeseries("Open files and threads", "File descriptors and threads of each vLLM process.",
                   [target(f"sum by (role, pid) (vllm_otel_process_open_fds{{{SEL_TARGET}}})", "fds {{role}} {{pid}}"),
                    target(f"sum by (role, pid) (vllm_otel_process_threads{{{SEL_TARGET}}})",
                           "threads {{role}} {{pid}}")], "none", w=8, min=0),
        bargauge("Processes alive", "vLLM processes alive, by role.",
                 [target(f"sum by (role) (vllm_otel_process_count{{{SEL_TARGET}}})", "{{role}}", instant=True)],
                 "none", w=8),
    ])


def _host() -> row:
    return row("Host", collapsed=True, panels=[
        timeseries("/dev/shm", "Shared memory used by vLLM's inter-process queues, against its size.",
                   [target(f"max by (instance) (vllm_otel_host_shm_used_bytes{{{SEL_TARGET}}})", "used {{instance}}"),
                    target(f"max by (instance) (vllm_otel_host_shm_total_bytes{{{SEL_TARGET}}})", "size {{instance}}")],
                   "bytes", w=8, min=0),
        timeseries("Host memory available", "Memory the host can still give, against what it has.",
                   [target(f"max by (instance) (vllm_otel_host_memory_available_bytes{{{SEL_TARGET}}})",
                           "available {{instance}}"),
                    target(f"max by (instance) (vllm_otel_host_memory_total_bytes{{{SEL_TARGET}}})",
                           "total {{instance}}")], "bytes", w=8, min=0),
        timeseries("Load per CPU", "1-minute load average divided by the logical CPUs.",
                   [target(f"max by (instance) (vllm_otel_host_load1{{{SEL_TARGET}}}) / "
                           f"max by (instance) (vllm_otel_host_cpu_count{{{SEL_TARGET}}})", "{{instance}}")],
                   "percentunit", w=8, min=0),
    ])


def _export() -> row:
    return row("OTLP export health", collapsed=True, panels=[
        timeseries("Exported / s", "Spans and metric batches vllm-otel exported over OTLP.",
                   [target(_rate("vllm_otel_otlp_exported_total", SEL_TARGET, "signal"), "{{signal}}")],
                   "ops", w=8, min=0),
        timeseries("Failed and dropped / s", "Failed export batches and dropped telemetry items "
                   "(queue full or collector down); serving never waits for the collector.",
                   [target(_rate("vllm_otel_otlp_failed_total", SEL_TARGET, "signal"), "failed {{signal}}"),
                    target(_rate("vllm_otel_otlp_dropped_total", SEL_TARGET, "signal"), "dropped {{signal}}")],
                   "ops", w=8, min=0),
        timeseries("Hook errors / s", "Exceptions caught inside vllm-otel's hooks (vLLM kept serving); "
                   "0 when none was ever caught.",
                   [target(f"{_rate('vllm_otel_hook_errors_total', SEL_TARGET, 'hook')} or vector(0)",
                           "{{hook}}")], "ops", w=8, min=0),
    ])


def _spec_decode() -> row:
    return row("Speculative decoding", collapsed=True, panels=[
        timeseries("Acceptance rate", "Accepted draft tokens / proposed draft tokens (only with "
                   "speculative decoding on).",
                   [target(f"{_rate('vllm:spec_decode_num_accepted_tokens_total')} / "
                           f"{_rate('vllm:spec_decode_num_draft_tokens_total')}", "acceptance")],
                   "percentunit", w=12, min=0, max=1),
        timeseries("Mean acceptance length", "Tokens produced per draft: 1 + accepted / drafts.",
                   [target(f"1 + {_rate('vllm:spec_decode_num_accepted_tokens_total')} / "
                           f"{_rate('vllm:spec_decode_num_drafts_total')}", "tokens per draft")],
                   "short", w=12, min=0),
    ])


def build() -> dict[str, Any]:
    return dashboard(
        UID, "vLLM serving", "vLLM serving health, latency, throughput and saturation per job, model, "
        "instance and engine (vLLM's metrics plus vllm-otel's).", ["vllm", "serving"], SERVING_VARIABLES,
        [_stats(), _health(), _latency_row(), _throughput(), _saturation(), _per_instance(), _processes(),
         _host(), _export(), _spec_decode()], ANNOTATIONS)
