"""Deterministic synthetic vLLM series (as raw inputs or a query_range response), for tests and benchmarks.

Not a simulator of vLLM: just shapes that exercise each failure and each data problem (ramps,
noise, frozen token counters, queues, counter resets, gaps), reproducible from a seed.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vllm_otel.forecast.promjson import RawFrame

__all__ = ["TTFT_BUCKETS", "scenario", "to_query_range", "frame_from_scenarios", "SCENARIOS"]

# vLLM's bucket bounds for vllm:time_to_first_token_seconds (without +Inf).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
SCENARIOS = ("steady", "noisy_flat", "kv_ramp", "stall", "queue", "memory_leak")

_METRIC = {
    "kv_usage": "vllm:kv_cache_usage_perc",
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "preemptions": "vllm:num_preemptions_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "finished": "vllm:request_success_total",
    "gpu_memory_used": "vllm_otel_gpu_memory_used_bytes",
    "gpu_memory_total": "vllm_otel_gpu_memory_total_bytes",
}


def scenario(kind: str, steps: int, step_s: float = 5.0, seed: int = 0, onset: int | None = None,
             limit: int = 16) -> dict[str, np.ndarray]:
    """Input arrays (length ``steps``) for one instance; ``ttft`` is (steps, B+1) cumulative buckets.

    ``onset``: the step where the scenario's trouble starts (default: 60% of the way).
    """
    if kind not in SCENARIOS:
        raise ValueError(f"unknown scenario {kind!r}; known: {SCENARIOS}")
    rng = np.random.default_rng(seed)
    n = int(steps)
    k = np.arange(n)
    onset = int(0.6 * n) if onset is None else int(onset)
    kv = np.clip(0.45 + rng.normal(0, 0.02, n), 0, 1)
    running = np.clip(np.round(limit / 2 + rng.normal(0, 1.5, n)), 1, limit)
    waiting = np.zeros(n)
    tok_rate = 150.0 + rng.normal(0, 10, n)
    preempt_inc = np.zeros(n)
    ttft_mu = np.full(n, np.log(0.2))
    mem = np.full(n, 0.6)
    if kind == "noisy_flat":
        kv = np.clip(0.85 + rng.normal(0, 0.03, n), 0, 1)
    elif kind == "kv_ramp":
        ramp = np.clip((k - onset) / max(n - onset, 1), 0, None)
        kv = np.clip(0.5 + 0.7 * ramp + rng.normal(0, 0.01, n), 0, 1)
        full = kv >= 0.9
        preempt_inc = np.where(full, rng.poisson(0.6, n), 0).astype(float)
        waiting = np.where(full, np.round((kv - 0.9) * 100), 0)
        ttft_mu = np.log(0.2) + 2.5 * ramp
    elif kind == "stall":
        tok_rate = np.where(k >= onset, 0.0, tok_rate)
        waiting = np.where(k >= onset, np.minimum((k - onset) // 3, 20), 0).astype(float)
    elif kind == "queue":
        grow = np.clip(k - onset, 0, None) * 0.4
        waiting = np.round(grow + np.where(grow > 0, rng.normal(0, 0.5, n), 0)).clip(0)
        running = np.where(waiting > 0, float(limit), running)
        ttft_mu = np.log(0.2) + 0.05 * grow
    elif kind == "memory_leak":
        mem = 0.6 + 0.45 * np.clip((k - onset) / max(n - onset, 1), 0, None) + rng.normal(0, 0.002, n)
    tokens = np.cumsum(np.clip(tok_rate, 0, None) * step_s)
    preemptions = np.cumsum(preempt_inc)
    # TTFT: a few requests per step, log-normal around the scenario's median.
    reqs = rng.poisson(3, n)
    les = np.array(TTFT_BUCKETS + (np.inf,))
    which = np.repeat(np.arange(n), reqs)
    ttfts = np.exp(ttft_mu[which] + rng.normal(0, 0.3, len(which)))
    per_bucket = np.zeros((n, len(les)))
    np.add.at(per_bucket, (which, np.searchsorted(les, ttfts, side="left")), 1.0)
    per_step = np.cumsum(per_bucket, axis=1)  # cumulative over le, as Prometheus buckets are
    # Requests finish at running / service time (Little's law, 8 s per request), none while the
    # engine is stalled: what the detector's offered-load model learns capacity from. Drawn last,
    # so the other series are the same as before this one was added.
    flowing = tok_rate > 0
    finished = np.cumsum(np.where(flowing, rng.poisson(np.clip(running, 0, None) * step_s / 8.0), 0.0))
    return {
        "kv_usage": kv, "running": running, "waiting": waiting, "preemptions": preemptions,
        "generation_tokens": tokens, "finished": finished, "ttft": np.cumsum(per_step, axis=0),
        "gpu_memory_used": mem * 80e9, "gpu_memory_total": np.full(n, 80e9),
    }


def to_query_range(instances: Mapping[str, Mapping[str, np.ndarray]], t0: float = 1_700_000_000.0,
                   step_s: float = 5.0, model_name: str = "tiny") -> dict[str, Any]:
    """A Prometheus query_range response holding these series; NaN samples are left out (gaps)."""
    result: list[dict[str, Any]] = []
    les = [*(repr(b) for b in TTFT_BUCKETS), "+Inf"]
    for inst, series in instances.items():
        n = len(next(iter(series.values())))
        ts = t0 + step_s * np.arange(n)
        base = {"instance": inst, "model_name": model_name, "engine": "0", "job": "vllm"}

        def add(labels: dict[str, str], values: np.ndarray) -> None:
            pts = [[round(float(t), 3), repr(float(v))] for t, v in zip(ts, values) if np.isfinite(v)]
            if pts:
                result.append({"metric": labels, "values": pts})

        for name, arr in series.items():
            if name == "ttft":
                for b, le in enumerate(les):
                    add({"__name__": "vllm:time_to_first_token_seconds_bucket", **base, "le": le}, arr[:, b])
            elif name in _METRIC:
                labels = {"__name__": _METRIC[name], **base}
                if name.startswith("gpu_"):
                    labels = {"__name__": _METRIC[name], "instance": inst, "gpu": "0", "engine": "0"}
                add(labels, arr)
    return {"status": "success", "data": {"resultType": "matrix", "result": result}}


def frame_from_scenarios(instances: Mapping[str, Mapping[str, np.ndarray]], t0: float = 1_700_000_000.0,
                         step_s: float = 5.0) -> RawFrame:
    """The RawFrame :func:`~vllm_otel.forecast.promjson.parse_query_range` would build, without JSON."""
    units = list(instances)
    n = len(next(iter(next(iter(instances.values())).values())))
    values: dict[str, np.ndarray] = {}
    hist = None
    for u, (_, series) in enumerate(instances.items()):
        for name, arr in series.items():
            if name == "ttft":
                if hist is None:
                    hist = np.full((len(units), n, arr.shape[1]), np.nan)
                hist[u] = arr
            else:
                values.setdefault(name, np.full((len(units), n), np.nan))[u] = arr
    hists = {} if hist is None else {"ttft": (np.array(TTFT_BUCKETS + (np.inf,)), hist)}
    return RawFrame(t0 + step_s * np.arange(n), step_s, units, list(units), values, hists)
