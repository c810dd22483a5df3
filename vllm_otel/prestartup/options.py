"""What the check is asked about: the vLLM settings that decide whether vLLM can start."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["CheckOptions", "options_from_vllm_argv"]


@dataclass
class CheckOptions:
    model: str | None = None
    host: str = "0.0.0.0"
    port: int | None = 8000
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256          # vLLM's default concurrency
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.92
    # vLLM-cpu reserves VLLM_CPU_KVCACHE_SPACE GiB for the KV cache (None: not set).
    cpu_kvcache_space_gib: float | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # Checks that start a process or read hardware can be turned off (tests of other parts).
    probe_dtype: bool = True


def options_from_vllm_argv(argv: Sequence[str], env: Mapping[str, str] | None = None) -> CheckOptions:
    """The settings of a vLLM command line (``vllm serve M ...``, ``python -m
    vllm.entrypoints.openai.api_server --model M ...``); unknown arguments are ignored."""
    env = dict(os.environ if env is None else env)
    args = list(argv)
    # ``vllm serve MODEL``: the model is the positional after "serve".
    positional_model = None
    if "serve" in args:
        i = args.index("serve")
        if i + 1 < len(args) and not args[i + 1].startswith("-"):
            positional_model = args[i + 1]
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ns, _ = p.parse_known_args(args)
    space = env.get("VLLM_CPU_KVCACHE_SPACE")
    return CheckOptions(model=ns.model or positional_model, host=ns.host, port=ns.port, dtype=ns.dtype,
                        max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                        tensor_parallel_size=ns.tensor_parallel_size,
                        gpu_memory_utilization=ns.gpu_memory_utilization,
                        cpu_kvcache_space_gib=float(space) if space else None, env=env)
