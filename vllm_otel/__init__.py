"""vllm-otel: OpenTelemetry observability, failure forecasting and guarded mitigation for vLLM.

Importing this package never imports vLLM: the services (forecaster, receiver, CLI tools) run on
hosts without it. Code that runs inside vLLM lives in :mod:`vllm_otel.instrument`.
"""

from vllm_otel.config import ConfigError, MonitorConfig, load_config

__version__ = "0.1.0"

__all__ = ["__version__", "ConfigError", "MonitorConfig", "load_config"]
