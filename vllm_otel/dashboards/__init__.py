"""Grafana dashboards for vLLM and vllm-otel, generated from Python (``vllm-otel dashboards``).

The committed JSON under ``dashboards/`` is this package's output; ``vllm-otel dashboards build
--check`` fails when it is stale or names a metric nobody defines.
"""

from vllm_otel.dashboards.build import DASHBOARDS, build_all

__all__ = ["DASHBOARDS", "build_all"]
