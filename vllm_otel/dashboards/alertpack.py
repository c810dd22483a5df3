"""The generated part of the alert pack: SLO burn rates and error share, absent targets, GPU, and
the pipeline itself, from the selectors and thresholds in ``alerts/config.yml``.

Written by ``vllm-otel dashboards build`` next to the hand-written rule files; each generated file
has its promtool test file in ``alerts/tests/`` (written by hand, against the default config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_config", "rule_files", "RUNBOOK", "YamlDumper"]

RUNBOOK = "https://github.com/vllm-otel/vllm-otel/blob/main/docs/runbooks.md#"


def load_config(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "alerts" / "config.yml").read_text())


def _alert(name: str, expr: str, severity: str, summary: str, description: str, for_: str = "0m",
           keep_firing_for: str | None = None, **labels: str) -> dict[str, Any]:
    r: dict[str, Any] = {"alert": name, "expr": expr, "for": for_}
    if keep_firing_for:
        r["keep_firing_for"] = keep_firing_for
    r["labels"] = {"severity": severity, **labels}
    r["annotations"] = {"summary": summary, "description": description,
                        "runbook_url": RUNBOOK + name.lower()}
    return r


_SLOS = {  # key -> (alert stem, histogram, what, what was slow)
    "ttft": ("Ttft", "vllm:time_to_first_token_seconds", "time to first token", "first tokens"),
    "itl": ("Itl", "vllm:inter_token_latency_seconds", "inter-token latency", "output tokens"),
    "e2e": ("E2e", "vllm:e2e_request_latency_seconds", "end-to-end latency", "requests"),
}


def _slo_rules(c: dict[str, Any]) -> list[dict[str, Any]]:
    job = c["selectors"]["vllm_job"]
    by = "instance, model_name"
    rules = []
    for key, (stem, metric, what, units) in _SLOS.items():
        slo = c["slo"][key]
        budget = float(slo["error_budget"])

        def bad(window: str) -> str:
            sel = f'job="{job}"'
            return (f"(1 - sum by ({by}) (rate({metric}_bucket{{{sel}, le=\"{slo['le']}\"}}[{window}]))"
                    f" / sum by ({by}) (rate({metric}_count{{{sel}}}[{window}])))")

        for speed, severity in (("fast", "critical"), ("slow", "warning")):
            w = c["slo"][speed]
            limit = round(float(w["factor"]) * budget, 6)
            expr = f"{bad(w['long'])} > {limit}\nand\n{bad(w['short'])} > {limit}"
            rules.append(_alert(
                f"Vllm{stem}SloBurn{speed.capitalize()}", expr, severity,
                f"vLLM is burning its {what} error budget {w['factor']}x too fast.",
                f"On {{{{ $labels.instance }}}} ({{{{ $labels.model_name }}}}) {{{{ $value | humanizePercentage }}}} "
                f"of {units} took longer than {slo['le']} s ({what}) over the last {w['long']} (and too many "
                f"over the last {w['short']} as well); the objective allows {budget:.2%}.", w["for"]))
    e = c["errors"]
    rules.append(_alert(
        "VllmRequestErrors",
        f'sum by ({by}) (rate(vllm:request_success_total{{job="{job}", finished_reason="error"}}[5m]))\n'
        f'/ sum by ({by}) (rate(vllm:request_success_total{{job="{job}"}}[5m])) > {e["request_error_share"]}',
        "warning", "vLLM finishes many requests with an error.",
        "{{ $value | humanizePercentage }} of the requests finished on {{ $labels.instance }} "
        "({{ $labels.model_name }}) over 5 minutes ended with finish reason error.", e["for"]))
    rules.append(_alert(
        "VllmHttp5xx",
        f'sum by (instance) (rate(http_requests_total{{job="{job}", status="5xx"}}[5m]))\n'
        f'/ sum by (instance) (rate(http_requests_total{{job="{job}"}}[5m])) > {e["http_5xx_share"]}',
        "warning", "vLLM's HTTP server answers with many 5xx errors.",
        "{{ $value | humanizePercentage }} of the HTTP answers of {{ $labels.instance }} over 5 minutes "
        "were 5xx.", e["for"]))
    return rules


def _target_rules(c: dict[str, Any]) -> list[dict[str, Any]]:
    s = c["selectors"]
    out = []
    for name, key, what in (("VllmTargetAbsent", "vllm_job", "vLLM"),
                            ("VllmOtelForecasterAbsent", "forecaster_job", "the vllm-otel forecaster"),
                            ("VllmOtelReceiverAbsent", "receiver_job", "the vllm-otel receiver")):
        out.append(_alert(
            name, f'absent(up{{job="{s[key]}"}})', "critical",
            f"Prometheus has no target for {what}.",
            f"No `up` series exists for job {s[key]}: the target vanished from service discovery (a "
            "deleted Service or pod, a relabelling change), so `up == 0` alerts cannot fire.", "5m",
            job=s[key]))
    return out


def _gpu_rules(c: dict[str, Any]) -> list[dict[str, Any]]:
    g = c["gpu"]
    by = "instance, gpu"
    return [
        _alert("VllmGpuXidError", f"sum by ({by}, xid) (increase(vllm_otel_gpu_xid_errors_total[5m])) > 0",
               "critical", "A GPU reported an XID error.",
               "GPU {{ $labels.gpu }} on {{ $labels.instance }} reported XID {{ $labels.xid }} in the last "
               "5 minutes.", keep_firing_for="10m"),
        _alert("VllmGpuEccUncorrectable",
               f'sum by ({by}) (increase(vllm_otel_gpu_ecc_errors_volatile_total{{error_type="uncorrected"}}[5m])) > 0',
               "critical", "A GPU had uncorrectable ECC errors.",
               "GPU {{ $labels.gpu }} on {{ $labels.instance }} had uncorrectable ECC errors in the last 5 "
               "minutes: results computed on it may be wrong.", keep_firing_for="10m"),
        _alert("VllmGpuRowRemapFailure", f"max by ({by}) (vllm_otel_gpu_row_remap_failure) == 1", "critical",
               "A GPU failed to remap a memory row.",
               "GPU {{ $labels.gpu }} on {{ $labels.instance }} reports a failed row remap: it should "
               "be taken out of service.", "1m"),
        _alert("VllmGpuThermalSlowdown",
               f'max by ({by}) (vllm_otel_gpu_clocks_event_reasons{{reason=~"hw_thermal_slowdown|sw_thermal_slowdown"}}) == 1',
               "warning", "A GPU slows itself down because it is too hot.",
               "GPU {{ $labels.gpu }} on {{ $labels.instance }} holds its clocks down for temperature.", "2m"),
        _alert("VllmGpuNearSlowdownTemperature",
               f"max by ({by}) (vllm_otel_gpu_temperature_celsius - vllm_otel_gpu_slowdown_temperature_celsius)"
               f" > -{g['slowdown_margin_celsius']}",
               "warning", "A GPU runs close to its slowdown temperature.",
               f"GPU {{{{ $labels.gpu }}}} on {{{{ $labels.instance }}}} is within "
               f"{g['slowdown_margin_celsius']} °C of the temperature at which it slows down "
               "({{ $value | humanize }} °C from it).", "5m"),
        _alert("VllmGpuClocksThrottled",
               f'max by ({by}, reason) (vllm_otel_gpu_clocks_event_reasons{{reason=~"hw_slowdown|hw_power_brake_slowdown|sw_power_cap"}}) == 1',
               "warning", "A GPU's clocks are held down by power or a hardware slowdown.",
               "GPU {{ $labels.gpu }} on {{ $labels.instance }} has run throttled ({{ $labels.reason }}) for "
               f"{g['throttle_for']}.", g["throttle_for"]),
    ]


def _pipeline_rules(c: dict[str, Any]) -> list[dict[str, Any]]:
    p = c["pipeline"]
    rx = f'job="{c["selectors"]["receiver_job"]}"'
    return [
        _alert("VllmOtelKillSwitchEngaged", f"max by (job) (vllm_otel_mitigation_kill_switch{{{rx}}}) == 1",
               "warning", "Mitigation is switched off by the kill switch.",
               f"The kill switch of {{{{ $labels.job }}}} has been on for {p['kill_switch_for']}: no "
               "mitigation runs until someone turns it off.", p["kill_switch_for"]),
        _alert("VllmOtelWorkerHeartbeatStale",
               f"time() - max by (instance) (vllm_otel_receiver_worker_heartbeat_timestamp_seconds{{{rx}}})"
               f" > {p['heartbeat_stale_s']}",
               "critical", "The mitigation worker has stopped running.",
               "The background worker of receiver {{ $labels.instance }} last ran {{ $value | humanizeDuration }} "
               "ago: alerts are stored but nothing acts on them.", "1m"),
        _alert("VllmOtelWebhookErrors",
               f'sum by (instance, code) (rate(vllm_otel_receiver_webhooks_total{{{rx}, code=~"4..|5.."}}[5m])) > 0',
               "warning", "The mitigation receiver rejects Alertmanager's webhooks.",
               "Receiver {{ $labels.instance }} answered webhooks with HTTP {{ $labels.code }} for 5 minutes "
               "(401/403: Alertmanager's token; 413/422: payload; 503: store down).", "5m"),
        _alert("VllmOtelApprovalsWaiting",
               f'max (vllm_otel_receiver_jobs{{{rx}, state="waiting_approval"}}) > 0',
               "warning", "Proposed mitigation actions wait for a human's approval.",
               f"{{{{ $value }}}} actions have waited for approval for {p['approvals_waiting_for']}: "
               "approve or reject them (POST /actions/ID/approve or /reject).", p["approvals_waiting_for"]),
        _alert("VllmOtelEscalation",
               f"sum by (instance, reason) (increase(vllm_otel_mitigation_escalations_total{{{rx}}}[10m])) > 0",
               "warning", "Automation stopped and asked for a human.",
               "Receiver {{ $labels.instance }} escalated to a human in the last 10 minutes (reason "
               "{{ $labels.reason }}).", keep_firing_for="10m"),
        _alert("VllmOtelOtlpDropping",
               "sum by (instance, signal) (rate(vllm_otel_otlp_dropped_total[5m])) > 0",
               "warning", "vllm-otel drops telemetry it could not export.",
               "{{ $labels.instance }} dropped {{ $value | humanize }} {{ $labels.signal }} items per second "
               f"for {p['otlp_drop_for']}: the OTLP collector is down, slow or refusing.", p["otlp_drop_for"]),
        _alert("VllmOtelHookErrors",
               "sum by (instance, hook) (increase(vllm_otel_hook_errors_total[10m])) > 0",
               "warning", "vllm-otel's hooks inside vLLM raised errors.",
               "Hook {{ $labels.hook }} on {{ $labels.instance }} raised in the last 10 minutes; vLLM kept "
               "serving, but some telemetry is missing.", keep_firing_for="10m"),
    ]


_FILES = {
    "vllm-slo.rules.yml": ("vllm-slo", "Latency SLO burn rates and error share", _slo_rules),
    "vllm-targets.rules.yml": ("vllm-targets", "Targets that vanished from Prometheus", _target_rules),
    "vllm-gpu.rules.yml": ("vllm-gpu", "GPU health (vllm-otel's NVML collector)", _gpu_rules),
    "vllm-otel-pipeline.rules.yml": ("vllm-otel-pipeline", "The vllm-otel pipeline itself", _pipeline_rules),
}


class YamlDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so generated YAML reads like the hand-written."""


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


YamlDumper.add_representer(str, _str)


def rule_files(root: Path) -> dict[Path, str]:
    c = load_config(root)
    out = {}
    for name, (group, what, fn) in _FILES.items():
        test = name.replace(".rules.yml", ".test.yml")
        head = (f"# {what}. Generated by `vllm-otel dashboards build` from alerts/config.yml; do not edit.\n"
                f"# promtool tests: alerts/tests/{test}; runbooks: docs/runbooks.md.\n")
        body = yaml.dump({"groups": [{"name": group, "rules": fn(c)}]}, Dumper=YamlDumper, sort_keys=False,
                         width=200, allow_unicode=True)
        out[Path("alerts") / name] = head + body
    return out
