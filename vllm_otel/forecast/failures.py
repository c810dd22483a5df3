"""The failure catalog: what counts as each failure, as configurable thresholds on signals.

The failure-type names are part of the interface (metric labels, alert rules, mitigation policy),
so they are constants here. Each failure is defined on one *score signal* (see
:mod:`vllm_otel.forecast.signals`) compared with a threshold, plus, for some, an extra condition
(thermal throttling). The same definitions label failures in the backtest and mark a failure as
already happening (probability 1, time to failure 0) in the detector, so the two never disagree.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FAILURE_TYPES", "FailureCatalog", "SCORE_SIGNAL", "STRICT", "FORECAST_SIGNAL",
    "KVCacheExhaustion", "PreemptionStorm", "QueueOverload", "TTFTSLOBreach", "EngineStall",
    "MemoryExhaustion", "GPUThermal", "GPUHardware",
]

FAILURE_TYPES: tuple[str, ...] = (
    "kv_cache_exhaustion", "preemption_storm", "queue_overload", "ttft_slo_breach",
    "engine_stall", "memory_exhaustion", "gpu_thermal", "gpu_hardware",
)

# failure -> the signal its definition (and the baselines) compare with the threshold
SCORE_SIGNAL: dict[str, str] = {
    "kv_cache_exhaustion": "kv_usage",
    "preemption_storm": "preemptions_window",
    "queue_overload": "waiting",
    "ttft_slo_breach": "ttft_quantile",
    "engine_stall": "flat_seconds",
    "memory_exhaustion": "memory_fraction",
    "gpu_thermal": "gpu_temperature",
    "gpu_hardware": "hardware_events",
}

# "grows by more than", "above": the failure needs the signal strictly over the threshold.
STRICT: frozenset[str] = frozenset({"preemption_storm", "ttft_slo_breach", "gpu_hardware"})

# failure -> the signal a statistical model forecasts. Stalls and hardware faults are not the
# continuation of a trend: they come from the state graph (and precursors) instead.
FORECAST_SIGNAL: dict[str, str] = {
    f: SCORE_SIGNAL[f] for f in FAILURE_TYPES if f not in ("engine_stall", "gpu_hardware")
}


class _Failure(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    # Preventive actions, by the names of mitigation strategies; the policy decides what runs.
    actions: list[str] = Field(default_factory=list)


class KVCacheExhaustion(_Failure):
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="vllm:kv_cache_usage_perc at or above")
    actions: list[str] = ["limit_admission", "reset_prefix_cache", "reduce_max_num_seqs"]


class PreemptionStorm(_Failure):
    max_preemptions: float = Field(5.0, ge=0.0, description="more than this many preemptions ...")
    window_s: float = Field(60.0, gt=0.0, description="... within this window")
    actions: list[str] = ["limit_admission", "reduce_max_num_seqs"]


class QueueOverload(_Failure):
    waiting_threshold: float | None = Field(None, gt=0.0, description="a set value; wins when given")
    running_limit: int | None = Field(
        None, gt=0, description="max running requests; None: learned as the most seen running "
                                "while requests wait")
    factor: float = Field(2.0, gt=0.0)
    actions: list[str] = ["limit_admission", "scale_out"]


class TTFTSLOBreach(_Failure):
    slo_s: float = Field(2.0, gt=0.0)
    quantile: float = Field(0.95, gt=0.0, lt=1.0)
    window_s: float = Field(60.0, gt=0.0)
    actions: list[str] = ["limit_admission", "scale_out"]


class EngineStall(_Failure):
    flat_s: float = Field(20.0, gt=0.0, description="generation tokens flat this long with work present")
    actions: list[str] = ["abort_stuck_requests", "restart_engine"]


class MemoryExhaustion(_Failure):
    process_limit_bytes: float | None = Field(
        None, gt=0.0, description="limit for the summed resident memory of the vLLM processes "
                                  "(e.g. the container's); None: process memory is not checked")
    gpu_limit_fraction: float = Field(0.98, gt=0.0, le=1.0, description="of device memory")
    actions: list[str] = ["drain_and_restart", "reduce_max_num_seqs"]


class GPUThermal(_Failure):
    slowdown_c: float | None = Field(None, description="None: the GPU's own slowdown threshold (NVML)")
    fallback_slowdown_c: float = Field(87.0, description="when the GPU does not report one")
    actions: list[str] = ["limit_admission", "notify_operator"]


class GPUHardware(_Failure):
    window_s: float = Field(60.0, gt=0.0, description="a new XID/ECC/remap event stays a failure this long")
    actions: list[str] = ["drain_instance", "notify_operator"]


class FailureCatalog(BaseModel):
    """Every failure type with its thresholds. ``FailureCatalog(kv_cache_exhaustion={"threshold": 0.9})``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kv_cache_exhaustion: KVCacheExhaustion = Field(default_factory=KVCacheExhaustion)
    preemption_storm: PreemptionStorm = Field(default_factory=PreemptionStorm)
    queue_overload: QueueOverload = Field(default_factory=QueueOverload)
    ttft_slo_breach: TTFTSLOBreach = Field(default_factory=TTFTSLOBreach)
    engine_stall: EngineStall = Field(default_factory=EngineStall)
    memory_exhaustion: MemoryExhaustion = Field(default_factory=MemoryExhaustion)
    gpu_thermal: GPUThermal = Field(default_factory=GPUThermal)
    gpu_hardware: GPUHardware = Field(default_factory=GPUHardware)

    def spec(self, failure_type: str) -> _Failure:
        if failure_type not in FAILURE_TYPES:
            raise KeyError(f"unknown failure type {failure_type!r}")
        return getattr(self, failure_type)

    def enabled(self) -> tuple[str, ...]:
        return tuple(f for f in FAILURE_TYPES if self.spec(f).enabled)

    def actions(self, failure_type: str) -> tuple[str, ...]:
        return tuple(self.spec(failure_type).actions)

    def threshold(self, failure_type: str, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        """The threshold on the failure's score signal, per row (NaN: not known yet)."""
        ref = signals[SCORE_SIGNAL[failure_type]]
        full = np.full(np.shape(ref), np.nan)
        if failure_type == "kv_cache_exhaustion":
            full[...] = self.kv_cache_exhaustion.threshold
        elif failure_type == "preemption_storm":
            full[...] = self.preemption_storm.max_preemptions
        elif failure_type == "queue_overload":
            q = self.queue_overload
            if q.waiting_threshold is not None:
                full[...] = q.waiting_threshold
            elif q.running_limit is not None:
                full[...] = q.factor * q.running_limit
            else:
                full = q.factor * np.asarray(signals["running_limit"], dtype=float)
        elif failure_type == "ttft_slo_breach":
            full[...] = self.ttft_slo_breach.slo_s
        elif failure_type == "engine_stall":
            full[...] = self.engine_stall.flat_s
        elif failure_type == "memory_exhaustion":
            full[...] = 1.0  # memory_fraction is already relative to the configured limit
        elif failure_type == "gpu_thermal":
            full = np.asarray(signals["gpu_temperature_limit"], dtype=float).copy()
        elif failure_type == "gpu_hardware":
            full[...] = 0.0
        return full

    def breached(self, signals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Which rows are failing now, per enabled failure type (unknown data: not failing)."""
        out: dict[str, np.ndarray] = {}
        for f in self.enabled():
            x = np.asarray(signals[SCORE_SIGNAL[f]], dtype=float)
            thr = self.threshold(f, signals)
            with np.errstate(invalid="ignore"):
                hit = (x > thr) if f in STRICT else (x >= thr)
                if f == "gpu_thermal":
                    hit = hit | (np.asarray(signals["gpu_throttle"], dtype=float) > 0)
            out[f] = np.asarray(hit, dtype=bool)  # NaN compares False: unknown is not failing
        return out


# The catalog's fields are the interface names; fail at import if they ever drift apart.
if tuple(FailureCatalog.model_fields) != FAILURE_TYPES:  # pragma: no cover
    raise ImportError("FailureCatalog fields and FAILURE_TYPES disagree")
