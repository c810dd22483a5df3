"""What the four dashboards share: annotations, the vLLM label filters, quantile helpers."""

from __future__ import annotations

from vllm_otel.dashboards.grafana import annotation, query_variable

__all__ = ["ANNOTATIONS", "SERVING_VARIABLES", "SEL", "SEL_ENGINE", "SEL_TARGET", "quantiles", "RI"]

RI = "$__rate_interval"

# vLLM's own series carry model_name and engine; ours inside vLLM carry engine (lifecycle) or
# nothing but the target's labels (processes, host, GPU, OTLP export).
SEL = 'job=~"$job", instance=~"$instance", model_name=~"$model_name", engine=~"$engine"'
SEL_ENGINE = 'job=~"$job", instance=~"$instance", engine=~"$engine"'
SEL_TARGET = 'job=~"$job", instance=~"$instance"'

# Variables come from a vLLM series, so labels of other exporters in the same Prometheus never
# show up in the drop-downs.
_V = "vllm:num_requests_running"
SERVING_VARIABLES = [
    query_variable("job", "Job", f"label_values({_V}, job)"),
    query_variable("instance", "Instance", f'label_values({_V}{{job=~"$job"}}, instance)'),
    query_variable("model_name", "Model", f'label_values({_V}{{job=~"$job", instance=~"$instance"}}, model_name)'),
    query_variable("engine", "Engine",
                   f'label_values({_V}{{job=~"$job", instance=~"$instance", model_name=~"$model_name"}}, engine)'),
]

ANNOTATIONS = [
    annotation("Alerts firing", 'ALERTS{alertstate="firing"}', color="red",
               title="{{alertname}}", text="{{instance}} {{severity}}"),
    # increase() misses the first decision of a strategy and outcome (its series starts at 1), so
    # series that did not exist one interval earlier count too.
    annotation("Mitigation actions",
               f"(sum by (strategy, outcome) (increase(vllm_otel_mitigations_total[{RI}])) > 0) or "
               f"sum by (strategy, outcome) (vllm_otel_mitigations_total unless vllm_otel_mitigations_total "
               f"offset {RI})",
               color="purple", title="mitigation {{strategy}}", text="outcome {{outcome}}"),
]


def quantiles(metric: str, sel: str, by: str = "") -> list[tuple[str, str]]:
    """(expr, legend) for p50/p95/p99 of a vLLM histogram and its mean."""
    grp = f"le{', ' + by if by else ''}"
    out = [(f"histogram_quantile({q}, sum by ({grp}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
            f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else "")) for q in (0.5, 0.95, 0.99)]
    byc = f" by ({by})" if by else ""
    out.append((f"sum{byc} (rate({metric}_sum{{{sel}}}[{RI}])) / sum{byc} (rate({metric}_count{{{sel}}}[{RI}]))",
                "mean" + (f" {{{{{by}}}}}" if by else "")))
    return out
