"""Signals: counters to increases/rates with resets, histograms to quantiles, gaps, stall clock."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_otel.forecast.failures import FAILURE_TYPES, FailureCatalog
from vllm_otel.forecast.signals import (
    HistogramInput, InputSeries, SignalExtractor, collect_samples, histogram_quantile,
)

LES = np.array([0.1, 0.5, 1.0, 2.5, np.inf])


def _step(ex: SignalExtractor, t: float, **values: float) -> dict[str, np.ndarray]:
    hist = values.pop("ttft", None)
    hists = {"ttft": HistogramInput(LES, np.array([hist], dtype=float))} if hist is not None else None
    return ex.update(np.array([0]), t, {k: np.array([v], dtype=float) for k, v in values.items()}, hists)


def test_histogram_quantile_follows_prometheus() -> None:
    counts = np.array([
        [10, 20, 30, 40, 40],      # rank 38 -> in (1, 2.5]: 1 + 1.5 * (38-30)/10
        [0, 0, 0, 0, 0],           # no observations -> NaN
        [0, 0, 0, 0, 10],          # all in +Inf -> highest finite bound
        [np.nan, 5, 10, 10, 10],   # a missing bucket takes the one below (none: 0)
        [5, 3, 10, 10, 10],        # non-monotonic counts are repaired
    ], dtype=float)
    q = histogram_quantile(0.95, LES, counts)
    assert q[0] == pytest.approx(1.0 + 1.5 * 0.8)
    assert np.isnan(q[1])
    assert q[2] == 2.5
    assert q[3] == pytest.approx(0.5 + 0.5 * 0.9)
    assert q[4] == pytest.approx(0.5 + 0.5 * (9.5 - 5) / 5)


def test_counter_reset_is_a_restart_and_counts_from_zero() -> None:
    ex = SignalExtractor(FailureCatalog(), step_s=5.0)
    s = [_step(ex, 5.0 * i, preemptions=v, generation_tokens=100.0 * (i + 1), running=1, waiting=0)
         for i, v in enumerate([10, 12, 14, 1, 3])]
    assert [x["restarted"][0] for x in s] == [0, 0, 0, 1, 0]
    # increases: -, 2, 2, 1 (reset: the new value), 2 -> window sums over 60 s
    assert np.isnan(s[0]["preemptions_window"][0])
    assert [x["preemptions_window"][0] for x in s[1:]] == [2, 4, 5, 7]
    assert s[1]["generation_rate"][0] == pytest.approx(20.0)


def test_gap_keeps_last_counter_value_and_window_expires() -> None:
    ex = SignalExtractor(FailureCatalog(), step_s=5.0)
    _step(ex, 0, preemptions=0)
    _step(ex, 5, preemptions=3)
    gap = _step(ex, 10, preemptions=np.nan)
    assert gap["preemptions_window"][0] == 3  # the window still holds the known increase
    after = _step(ex, 15, preemptions=7)
    assert after["preemptions_window"][0] == 7  # 3 + the 4 that happened across the gap
    late = _step(ex, 100, preemptions=7)
    assert late["preemptions_window"][0] == 0  # old increases left the 60 s window


def test_ttft_quantile_uses_the_window_increase() -> None:
    ex = SignalExtractor(FailureCatalog(), step_s=5.0)
    base = np.array([100, 200, 300, 300, 300], dtype=float)  # history before the window: fast
    _step(ex, 0, ttft=base)
    s = _step(ex, 5, ttft=base + np.array([0, 0, 0, 10, 10]))  # 10 new requests, all 1-2.5 s
    assert 1.0 < s["ttft_quantile"][0] <= 2.5
    assert ex.catalog.breached(s)["ttft_slo_breach"][0] == (s["ttft_quantile"][0] > 2.0)
    quiet = _step(ex, 200, ttft=base + np.array([0, 0, 0, 10, 10]))
    assert np.isnan(quiet["ttft_quantile"][0])  # no request in the last 60 s: unknown, not 0


def test_flat_clock_and_running_limit() -> None:
    ex = SignalExtractor(FailureCatalog(), step_s=5.0)
    flat = []
    tokens = [0, 50, 100, 100, 100, 100, 100, 100, 150]
    for i, tok in enumerate(tokens):
        s = _step(ex, 5.0 * i, generation_tokens=tok, running=4, waiting=2 if i > 2 else 0)
        flat.append(s["flat_seconds"][0])
    assert np.isnan(flat[0])
    assert flat[1:] == [0, 0, 5, 10, 15, 20, 25, 0]
    assert s["running_limit"][0] == 4
    idle = _step(ex, 50, generation_tokens=150, running=0, waiting=0)
    assert idle["flat_seconds"][0] == 0  # nothing to do is not a stall


def test_selectors_and_collect_samples() -> None:
    inputs = InputSeries()
    assert inputs.match("vllm:kv_cache_usage_perc", {}) == "kv_usage"
    assert inputs.match("vllm:gpu_cache_usage_perc", {}) == "kv_usage"  # older vLLM name
    assert inputs.match("vllm_otel_gpu_clocks_event_reasons", {"reason": "hw_thermal_slowdown"}) == \
        "gpu_thermal_throttle"
    assert inputs.match("vllm_otel_gpu_clocks_event_reasons", {"reason": "sw_power_cap"}) is None
    values, hists = collect_samples([
        ("vllm:num_requests_running", {"engine": "0"}, 3.0),
        ("vllm_otel_gpu_temperature_celsius", {"gpu": "0"}, 70.0),
        ("vllm_otel_gpu_temperature_celsius", {"gpu": "1"}, 82.0),
        ("vllm_otel_process_resident_memory_bytes", {"pid": "1"}, 1e9),
        ("vllm_otel_process_resident_memory_bytes", {"pid": "2"}, 2e9),
        ("vllm:time_to_first_token_seconds_bucket", {"le": "0.5"}, 4.0),
        ("vllm:time_to_first_token_seconds_bucket", {"le": "+Inf"}, 5.0),
        ("vllm:unrelated", {}, 1.0),
    ], inputs)
    assert values == {"running": 3.0, "gpu_temperature": 82.0, "process_memory": 3e9}
    assert hists == {"ttft": {0.5: 4.0, float("inf"): 5.0}}


def test_catalog_thresholds_are_configurable_and_names_fixed() -> None:
    assert FAILURE_TYPES == ("kv_cache_exhaustion", "preemption_storm", "queue_overload", "ttft_slo_breach",
                             "engine_stall", "memory_exhaustion", "gpu_thermal", "gpu_hardware")
    cat = FailureCatalog(kv_cache_exhaustion={"threshold": 0.9}, queue_overload={"running_limit": 8})
    sig = {"kv_usage": np.array([0.91]), "waiting": np.array([16.0]), "running_limit": np.array([np.nan])}
    assert cat.threshold("queue_overload", sig)[0] == 16
    assert cat.breached({**_blank(), **sig})["kv_cache_exhaustion"][0]
    with pytest.raises(ValueError):
        FailureCatalog(kv_cache_exhaustion={"threshold": 1.5})
    learned = FailureCatalog()  # no limit set: learned from running while requests wait
    assert np.isnan(learned.threshold("queue_overload", {**sig, "running_limit": np.array([np.nan])})[0])
    assert learned.threshold("queue_overload", {**sig, "running_limit": np.array([6.0])})[0] == 12


def _blank() -> dict[str, np.ndarray]:
    from vllm_otel.forecast.signals import SIGNALS

    return {s: np.array([np.nan]) for s in SIGNALS}
