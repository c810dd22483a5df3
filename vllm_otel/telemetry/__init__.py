"""The OpenTelemetry set-up shared by the code inside vLLM (:mod:`vllm_otel.instrument`) and the
services (the forecaster publishes its forecasts with it): settings from the OTEL_* variables,
the resource, private providers and export with counted outcomes.

It imports nothing from the rest of vllm_otel: both sides build on it.
"""

from vllm_otel.telemetry.export import BoundedSpanProcessor, CountingMetricExporter, ExportStats
from vllm_otel.telemetry.histograms import HistogramSet
from vllm_otel.telemetry.providers import build_meter_provider, build_tracer_provider, send_encoded
from vllm_otel.telemetry.settings import OtelSettings, build_resource

__all__ = ["OtelSettings", "build_resource", "ExportStats", "BoundedSpanProcessor", "CountingMetricExporter",
           "build_tracer_provider", "build_meter_provider", "HistogramSet", "send_encoded"]
