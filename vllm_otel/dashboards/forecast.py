"""Dashboard 2: the failure forecast (``vllm-otel forecaster``'s series) and the forecaster's health.

The forecaster publishes ``instance`` = the vLLM target it forecasts; scrape it with
``honor_labels: true`` so Prometheus keeps that label (compose/ and deploy/ do).
"""

from __future__ import annotations

from typing import Any

from vllm_otel.dashboards.common import ANNOTATIONS, RI
from vllm_otel.dashboards.grafana import dashboard, query_variable, row, stat, table, target, timeseries

__all__ = ["UID", "build", "ALARM_THRESHOLD"]

UID = "vllm-otel-forecast"
# The probability the forecast alerts page at (alerts/vllm-otel-forecast.rules.yml); drawn as the
# threshold line and used for "units at risk".
ALARM_THRESHOLD = 0.7

U = 'instance=~"$instance"'
P = f'{U}, failure_type=~"$failure_type"'

# forecast signal -> (the actual series it forecasts, unit). The forecaster forecasts the signals
# its failure types are defined on (vllm_otel.forecast.failures.FORECAST_SIGNAL); these three have
# a series of the same meaning in Prometheus (TTFT: the failure catalog's default quantile, 0.95).
SIGNAL_ACTUALS: dict[str, tuple[str, str]] = {
    "kv_usage": (f"max by (instance) (vllm:kv_cache_usage_perc{{{U}}})", "percentunit"),
    "waiting": (f"sum by (instance) (vllm:num_requests_waiting{{{U}}})", "none"),
    "ttft_quantile": ("histogram_quantile(0.95, sum by (instance, le) "
                      f"(rate(vllm:time_to_first_token_seconds_bucket{{{U}}}[{RI}])))", "s"),
}


def _variables() -> list[dict[str, Any]]:
    horizon = {"name": "horizon", "label": "Forecast horizon", "type": "custom", "query": "1m,2m,5m",
               "current": {"text": "2m", "value": "2m"}, "hide": 0, "multi": False, "includeAll": False,
               "options": [{"text": v, "value": v, "selected": v == "2m"} for v in ("1m", "2m", "5m")],
               "description": "The forecaster's --horizon: a forecast is drawn at the time it is for."}
    return [
        query_variable("instance", "Instance", "label_values(vllm_otel_forecaster_data_age_seconds, instance)"),
        query_variable("failure_type", "Failure type",
                       f"label_values(vllm_otel_failure_probability{{{U}}}, failure_type)"),
        horizon,
    ]


def _overview() -> row:
    return row("Overview", [
        stat("Forecaster up", "1 when the forecaster's data source answered on its last cycle.",
             [target("min (vllm_otel_forecaster_up)")], "none",
             steps=[(None, "red"), (1, "green")]),
        stat("Units forecast", "Instances (or engines) the forecaster publishes predictions for.",
             [target("sum (vllm_otel_forecaster_instances)")], "none"),
        stat("Highest failure probability", "The largest probability of any failure within the horizon.",
             [target(f"max (vllm_otel_failure_probability{{{P}}})")], "percentunit",
             steps=[(None, "green"), (0.5, "orange"), (ALARM_THRESHOLD, "red")]),
        stat("Units at risk", f"Units with some failure at probability >= {ALARM_THRESHOLD}.",
             [target(f"count (max by (instance, engine) (vllm_otel_failure_probability{{{P}}}) "
                     f">= {ALARM_THRESHOLD}) or vector(0)")], "none",
             steps=[(None, "green"), (1, "red")]),
        stat("Soonest failure", "Shortest predicted time to any failure (absent: none within the horizon).",
             [target(f"min (vllm_otel_time_to_failure_seconds{{{P}}})")], "s",
             steps=[(None, "red"), (60, "orange"), (300, "green")]),
        stat("Stale units", "Units whose predictions are the last made before their data stopped.",
             [target(f"sum (vllm_otel_forecaster_prediction_stale{{{U}}})")], "none",
             steps=[(None, "green"), (1, "orange")]),
    ])


def _predictions() -> row:
    return row("Predictions", [
        timeseries("Failure probability", f"P(failure within the horizon) per failure type; the dashed "
                   f"line is the alert threshold {ALARM_THRESHOLD}. 1 means happening now.",
                   [target(f"max by (instance, failure_type) (vllm_otel_failure_probability{{{P}}})",
                           "{{failure_type}} {{instance}}")],
                   "percentunit", w=12, min=0, max=1, threshold=ALARM_THRESHOLD),
        timeseries("Time to failure", "Seconds until the failure is more likely than not (0: now); "
                   "a gap means not within the horizon.",
                   [target(f"min by (instance, failure_type) (vllm_otel_time_to_failure_seconds{{{P}}})",
                           "{{failure_type}} {{instance}}")], "s", w=12, min=0),
        timeseries("Units at risk", f"Units with a failure probability >= {ALARM_THRESHOLD}, by failure type.",
                   [target(f"count by (failure_type) (vllm_otel_failure_probability{{{P}}} >= {ALARM_THRESHOLD}) "
                           "or vector(0)", "{{failure_type}}")], "none", w=12, min=0, stack=True),
        table("Latest predictions", "Probability and time to failure per unit and failure type, now.",
              [target(f"max by (instance, model_name, failure_type) (vllm_otel_failure_probability{{{P}}})",
                      instant=True, table=True),
               target(f"min by (instance, model_name, failure_type) (vllm_otel_time_to_failure_seconds{{{P}}})",
                      instant=True, table=True)], "none", w=12,
              organize={"excludeByName": {"Time": True},
                        "renameByName": {"Value #A": "probability", "Value #B": "time to failure (s)"}}),
    ])


def _band(signal: str, actual: str, unit: str) -> dict[str, Any]:
    fc = lambda q: (f'max by (instance) (vllm_otel_forecast{{{U}, signal="{signal}", quantile="{q}"}} '  # noqa: E731
                    "offset $horizon)")
    p = timeseries(f"Forecast vs actual: {signal}",
                   f"The forecast of `{signal}` made one horizon earlier (10 %-90 % band and median) against "
                   "the series it forecasts: a good forecaster's band holds the actual line.",
                   [target(fc("0.1"), "q10 {{instance}}"), target(fc("0.9"), "q90 {{instance}}"),
                    target(fc("0.5"), "median {{instance}}"), target(actual, "actual {{instance}}")],
                   unit, w=12, min=0,
                   overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                               "properties": [{"id": "custom.fillBelowTo", "value": "A"},
                                              {"id": "custom.lineWidth", "value": 0}]},
                              {"matcher": {"id": "byFrameRefID", "options": "A"},
                               "properties": [{"id": "custom.lineWidth", "value": 0}]},
                              {"matcher": {"id": "byFrameRefID", "options": "D"},
                               "properties": [{"id": "custom.lineWidth", "value": 2},
                                              {"id": "color", "value": {"mode": "fixed",
                                                                        "fixedColor": "red"}}]}])
    return p


def _signals() -> row:
    return row("Forecast signals", [_band(s, a, u) for s, (a, u) in SIGNAL_ACTUALS.items()])


def _health() -> row:
    return row("Forecaster health", [
        timeseries("Data age", "Seconds since each unit's newest sample; grows while data is missing.",
                   [target(f"max by (instance, engine) (vllm_otel_forecaster_data_age_seconds{{{U}}})",
                           "{{instance}} {{engine}}")], "s", w=8, min=0),
        timeseries("Cycle duration", "p50/p99 of one forecasting cycle (fetch, detector, refits, publish).",
                   [target(f"histogram_quantile({q}, sum by (le) (rate(vllm_otel_forecaster_cycle_duration_seconds_bucket[{RI}])))",
                           f"p{int(q * 100)}") for q in (0.5, 0.99)], "s", w=8, min=0),
        timeseries("Errors / s", "Forecaster errors by the stage of the cycle they hit.",
                   [target(f"sum by (stage) (rate(vllm_otel_forecaster_errors_total[{RI}]))", "{{stage}}")],
                   "ops", w=8, min=0),
        timeseries("Cycles and refits / s", "Forecasting cycles run and statsmodels refits done.",
                   [target(f"sum (rate(vllm_otel_forecaster_cycles_total[{RI}]))", "cycles"),
                    target(f"sum (rate(vllm_otel_forecaster_refits_total[{RI}]))", "refits")], "ops", w=8, min=0),
        timeseries("Stale predictions", "1 while a unit's predictions are the last ones made before its "
                   "data stopped.",
                   [target(f"max by (instance, engine) (vllm_otel_forecaster_prediction_stale{{{U}}})",
                           "{{instance}} {{engine}}")], "none", w=8, min=0, max=1),
        timeseries("Last cycle age", "Seconds since the forecaster finished a cycle.",
                   [target("time() - max (vllm_otel_forecaster_last_cycle_timestamp_seconds)", "age")],
                   "s", w=8, min=0),
    ])


def build() -> dict[str, Any]:
    return dashboard(UID, "vLLM failure forecast", "Failure probabilities, times to failure and forecast "
                     "bands from vllm-otel's forecaster, with the forecaster's own health.",
                     ["vllm", "forecast"], _variables(), [_overview(), _predictions(), _signals(), _health()],
                     ANNOTATIONS)
