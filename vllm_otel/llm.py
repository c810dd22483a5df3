"""The public offline API: ``vllm_otel.LLM(model=..., enable_monitoring=True)``,
``llm.get_monitoring_status()`` and ``create_monitored_engine(engine_args)``.

``vllm.LLM`` rejects keyword arguments it does not know, and vLLM loads our plugin only inside
``LLM.__init__``, too late to teach it a new one; :class:`LLM` here is a drop-in subclass that
accepts ``enable_monitoring``. With plain ``vllm.LLM``, ``VLLM_ENABLE_MONITORING=true`` does the
same (and ``get_monitoring_status()`` is available on it once our plugin has loaded).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "create_monitored_engine"]


def _base_llm() -> type:
    from vllm import LLM as VllmLLM

    return VllmLLM


def __getattr__(name: str) -> Any:  # lazy: importing vllm_otel must not import vLLM
    if name == "LLM":
        cls = _make_llm_class()
        globals()["LLM"] = cls
        return cls
    raise AttributeError(name)


def _make_llm_class() -> type:
    from vllm_otel.instrument.patches import install, request_monitoring

    base = _base_llm()
    install()

    class LLM(base):  # type: ignore[misc, valid-type]
        """``vllm.LLM`` plus ``enable_monitoring=`` and ``get_monitoring_status()``."""

        def __init__(self, *args: Any, enable_monitoring: bool = False, **kwargs: Any) -> None:
            if enable_monitoring:
                with request_monitoring():
                    super().__init__(*args, **kwargs)
            else:
                super().__init__(*args, **kwargs)
            self.monitoring_enabled = enable_monitoring

        def get_monitoring_status(self) -> dict[str, Any]:
            from vllm_otel.instrument.patches import monitoring_status

            return monitoring_status(self)

    LLM.__qualname__ = LLM.__name__ = "LLM"
    return LLM


def create_monitored_engine(engine_args: Any, usage_context: Any = None) -> tuple[Any, Any]:
    """Build a vLLM ``LLMEngine`` with vllm-otel attached; returns ``(engine, monitor)``.

    ``monitor`` offers ``get_engine_status()``, ``get_lifecycle()`` and ``export_data(path)``.
    """
    from vllm.v1.engine.llm_engine import LLMEngine

    from vllm_otel.instrument.monitor import get_monitor
    from vllm_otel.instrument.stat_logger import OtelStatLogger

    engine_args.disable_log_stats = False
    kwargs: dict[str, Any] = {"stat_loggers": [OtelStatLogger]}
    if usage_context is not None:
        kwargs["usage_context"] = usage_context
    engine = LLMEngine.from_engine_args(engine_args, **kwargs)
    return engine, get_monitor()
