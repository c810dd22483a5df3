"""Failure forecasting for vLLM: signals from Prometheus series, statsmodels forecasts, a learned
state graph, and a backtest against ``predict_linear``.

Modules, in the order data flows through them:

- :mod:`~vllm_otel.forecast.promjson`: query_range responses -> per-instance input arrays; sharding
- :mod:`~vllm_otel.forecast.signals`: inputs -> signals (rates, windowed increases, quantiles, stall clock)
- :mod:`~vllm_otel.forecast.failures`: the failure catalog (names fixed, thresholds configurable)
- :mod:`~vllm_otel.forecast.statespace`: the shared innovations state space, vectorised over series
- :mod:`~vllm_otel.forecast.models`: statsmodels-fitted models registered by name; selection by AIC
- :mod:`~vllm_otel.forecast.stategraph`: health states and their learned transition probabilities
- :mod:`~vllm_otel.forecast.precursors`: the precursor models (engine stall, load trend, offered
  load, preemption window, memory slope), one module each
- :mod:`~vllm_otel.forecast.detector`: :class:`PredictiveFailureDetector`, tying it all together;
  its settings in :mod:`~vllm_otel.forecast.detector_config`, what it gives in
  :mod:`~vllm_otel.forecast.results`
- :mod:`~vllm_otel.forecast.backtest`: replay, labels, scoring, baselines; ``cli``: ``vllm-otel backtest``

Names are imported lazily so that ``vllm-otel --help`` does not pay for numpy/scipy/pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PredictiveFailureDetector", "DetectorConfig", "Prediction", "Checkpoint", "StepResult",
    "FailureCatalog", "FAILURE_TYPES", "InputSeries", "load_query_range", "parse_query_range",
    "RawFrame", "InputError", "replay", "score", "get_model", "select_model", "register_model",
    "StateGraph",
]

_WHERE = {
    "PredictiveFailureDetector": "detector", "DetectorConfig": "detector_config", "Prediction": "results",
    "Checkpoint": "results", "StepResult": "results",
    "FailureCatalog": "failures", "FAILURE_TYPES": "failures",
    "InputSeries": "signals",
    "load_query_range": "promjson", "parse_query_range": "promjson", "RawFrame": "promjson",
    "InputError": "promjson",
    "replay": "backtest", "score": "backtest",
    "get_model": "models", "select_model": "models", "register_model": "models",
    "StateGraph": "stategraph",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
