"""``--auto-fix``: only safe, reversible, local changes, each one listed.

It writes one env file (shell ``KEY=value`` lines, usable as systemd ``EnvironmentFile=`` or with
``set -a; . FILE``) holding the settings the check recommends; an existing file is kept as
``FILE.bak`` first. It never changes system settings (sysctls, GPU modes, limits) and never touches
other processes: those findings stay in the report with their fix, for a person to apply.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from vllm_otel.prestartup.options import CheckOptions
from vllm_otel.prestartup.report import Report

__all__ = ["recommend", "apply_fixes", "DEFAULT_ENV_FILE"]

DEFAULT_ENV_FILE = "vllm-otel-prestartup.env"
GiB = 1024 ** 3


def recommend(rep: Report, opts: CheckOptions) -> tuple[dict[str, str], list[str]]:
    """(environment variables, vLLM arguments) that fix what the report found, where a setting can."""
    env: dict[str, str] = {}
    args: list[str] = []
    probe = rep.get("dtype_probe")
    head = rep.get("head_dtype")
    if (probe and probe.status == "error") or (head and rep.platform == "cpu" and rep.dtype == "float16"):
        args += ["--dtype", "float32"]
    mem = rep.memory
    if mem:
        # Switching to float32 doubles what each token and weight takes.
        scale = 2 if "--dtype" in args and rep.dtype in ("bfloat16", "float16") else 1
        per_tok, weights = mem["kv_bytes_per_token"] * scale, mem["weights_bytes"] * scale
        want_kv = mem["kv_all_requests_bytes"] * scale
        budget = mem["budget_bytes"]
        if rep.platform == "cpu":
            # Half of what is available for the KV cache at most: the API server needs the rest.
            space = max(1, min(int(want_kv / GiB) + 1, int((budget - weights) * 0.5 / GiB)))
            env["VLLM_CPU_KVCACHE_SPACE"] = str(space)
            kv_budget = space * GiB
        else:
            total = sum(r.data.get("total_bytes", 0) for r in rep.results if r.name.startswith("gpu"))
            if total:
                util = min(0.95, max(0.5, (weights + want_kv) / total + 0.02))
                if abs(util - opts.gpu_memory_utilization) > 0.01:
                    args += ["--gpu-memory-utilization", f"{util:.2f}"]
                kv_budget = int(min(budget, total * util) - weights)
            else:
                kv_budget = mem["kv_budget_bytes"]
        if per_tok and kv_budget < mem["kv_one_request_bytes"]:
            fit = max(16, int(max(0, kv_budget) // per_tok) // 16 * 16)
            args += ["--max-model-len", str(fit)]
    return env, args


def apply_fixes(rep: Report, opts: CheckOptions, env_file: str | Path = DEFAULT_ENV_FILE) -> list[str]:
    """Write the recommendations to ``env_file``; returns (and records in the report) each change."""
    env, args = recommend(rep, opts)
    changes: list[str] = []
    if not env and not args:
        rep.changes.append("nothing to change")
        return rep.changes
    path = Path(env_file)
    lines = ["# Written by `vllm-otel check --auto-fix`: the settings it recommends for this host.",
             "# Use: systemd EnvironmentFile=, or `set -a; . THIS_FILE; set +a` before starting vLLM."]
    for k, v in env.items():
        lines.append(f"{k}={shlex.quote(v)}")
        changes.append(f"{path}: {k}={v}")
    if args:
        # Not read by vLLM itself: the arguments to add to its command line, e.g. `vllm serve M $VLLM_OTEL_EXTRA_ARGS`.
        joined = " ".join(args)
        lines.append(f"VLLM_OTEL_EXTRA_ARGS={shlex.quote(joined)}")
        changes.append(f"{path}: VLLM_OTEL_EXTRA_ARGS={joined} (add to the vLLM command line)")
    if path.exists():
        backup = path.with_name(path.name + ".bak")
        path.replace(backup)
        changes.insert(0, f"kept the previous {path} as {backup}")
    path.write_text("\n".join(lines) + "\n")
    rep.changes.extend(changes)
    return changes
