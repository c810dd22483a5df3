"""Load generation: replay real LLM request traces (Azure 2023, Mooncake) against a server.

``load_trace`` reads a trace, ``replay`` / ``run_replay`` send it, and ``vllm_otel.loadgen.cli``
provides the ``vllm-otel replay`` subcommand.
"""

from .replay import (ERROR_KINDS, ReplayError, ReplaySummary, RequestResult, percentile, replay,
                     run_replay)
from .traces import TraceError, TraceRequest, load_trace, prompt_text, prompt_token_ids

__all__ = [
    "TraceRequest", "TraceError", "load_trace", "prompt_token_ids", "prompt_text",
    "replay", "run_replay", "ReplaySummary", "RequestResult", "ReplayError", "ERROR_KINDS",
    "percentile",
]
