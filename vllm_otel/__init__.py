"""vllm-otel: OpenTelemetry observability, failure forecasting and guarded mitigation for vLLM.

Importing this package never imports vLLM: the services (forecaster, receiver, CLI tools) run on
hosts without it. Code that runs inside vLLM lives in :mod:`vllm_otel.instrument`.
"""

from vllm_otel.config import ConfigError, MonitorConfig, load_config

__version__ = "0.1.0"

__all__ = ["__version__", "ConfigError", "MonitorConfig", "load_config", "LLM", "create_monitored_engine",
           "make_learner", "register_strategy"]


def __getattr__(name: str):  # noqa: ANN202 - lazy so that importing vllm_otel never imports vLLM
    if name in ("LLM", "create_monitored_engine"):
        from vllm_otel import llm

        return getattr(llm, name)
    if name == "make_learner":
        from vllm_otel.learn import make_learner

        return make_learner
    if name == "register_strategy":
        from vllm_otel.mitigate.strategies import register_strategy

        return register_strategy
    raise AttributeError(f"module 'vllm_otel' has no attribute {name!r}")
