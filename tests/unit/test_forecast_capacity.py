"""Queue overload from offered load against learned capacity (the detector's leading signal)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from vllm_otel.forecast.detector import PredictiveFailureDetector
from vllm_otel.forecast.results import StepResult
from vllm_otel.forecast.signals import SignalExtractor
from vllm_otel.forecast.failures import FailureCatalog

STEP = 1.0
LIMIT = 16
SERVICE_S = 4.0                      # each request holds a running slot this long: capacity 4 req/s
# The offered-load model is on by default: these settings leave it so, and the tests that turn it
# off say so.
CFG = {"step_s": STEP, "max_refits_per_step": 0, "catalog": {"queue_overload": {"running_limit": LIMIT}}}


def _alternative(name: str) -> type[PredictiveFailureDetector]:
    """A detector with a precursor model's alternative, from benchmarks/precursor_alternatives.py
    (not shipped: it lost to the model the detector uses)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "precursor_alternatives.py"
    spec = importlib.util.spec_from_file_location("precursor_alternatives", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _serve(rate: np.ndarray, seed: int = 0, freeze: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """A server with LIMIT slots, FIFO queue, fixed service time; Poisson arrivals per second.

    ``freeze=(a, b)``: the engine is stopped from step a to b: nothing is served and every
    gauge and counter keeps its last value (what Prometheus shows of a SIGSTOPped engine), while
    arrivals pile up and appear at once when it resumes.
    """
    rng = np.random.default_rng(seed)
    n = len(rate)
    left: list[float] = []          # remaining service of running requests
    waiting = 0
    finished = 0.0
    tokens = 0.0
    out = {k: np.zeros(n) for k in ("running", "waiting", "finished", "generation_tokens", "kv_usage",
                                    "preemptions")}
    for k in range(n):
        waiting += int(rng.poisson(rate[k]))
        frozen = freeze is not None and freeze[0] <= k < freeze[1]
        if not frozen:
            left = [x - STEP for x in left]
            done = sum(1 for x in left if x <= 1e-9)
            left = [x for x in left if x > 1e-9]
            finished += done
            take = min(waiting, LIMIT - len(left))
            left += [SERVICE_S] * take
            waiting -= take
            tokens += 10.0 * len(left)
            out["running"][k], out["waiting"][k] = len(left), waiting
            out["kv_usage"][k] = len(left) / 40.0
        else:
            for name in ("running", "waiting", "kv_usage"):
                out[name][k] = out[name][k - 1]
        out["finished"][k], out["generation_tokens"][k] = finished, tokens
    return out


def _run(det: PredictiveFailureDetector, series: dict[str, np.ndarray], t0: float = 1000.0) -> list[StepResult]:
    n = len(next(iter(series.values())))
    res = []
    for k in range(n):
        r = det.step(t0 + STEP * k, ["a"], {name: np.array([v[k]]) for name, v in series.items()})
        assert r is not None
        res.append(r)
    return res


def _p(results: list[StepResult], failure: str = "queue_overload") -> np.ndarray:
    j = results[0].failure_types.index(failure)
    return np.array([r.probability[0, j] for r in results])


def test_arrivals_over_capacity_warn_well_before_the_queue_overflows() -> None:
    n = 400
    rate = np.concatenate([np.full(100, 1.0), np.linspace(1.0, 6.0, 300)])   # capacity: 4 req/s
    series = _serve(rate)
    onset = int(np.argmax(series["waiting"] >= 2 * LIMIT))
    assert 250 < onset < n
    res = _run(PredictiveFailureDetector(CFG), series)
    p = _p(res)
    first = int(np.argmax(p >= 0.7))
    assert first > 0 and onset - first >= 30, (first, onset)
    # not while the offered load is well below capacity
    below = int(np.argmax(rate >= 0.85 * LIMIT / SERVICE_S))
    assert not (p[:below] >= 0.7).any()
    preds = [x for x in res[first].predictions() if x.failure_type == "queue_overload"]
    assert preds and "arrivals_over_capacity" in preds[0].precursors and preds[0].source == "precursor"
    assert preds[0].time_to_failure is not None and 0 < preds[0].time_to_failure <= 120
    # without the leading signal the same data is warned later (or not at all)
    q = _p(_run(PredictiveFailureDetector({**CFG, "use_capacity": False}), series))
    later = int(np.argmax(q >= 0.7)) if (q >= 0.7).any() else onset
    assert later > first


def test_busy_but_stable_load_and_a_swell_do_not_alarm() -> None:
    # 0.8 x capacity for minutes, then a swell rising steeply to 0.9 x and falling back
    rate = np.concatenate([np.full(300, 3.2), np.linspace(3.2, 3.6, 30), np.linspace(3.6, 2.0, 30),
                           np.full(100, 2.0)])
    series = _serve(rate, seed=2)
    assert not (series["waiting"] >= 2 * LIMIT).any()
    p = _p(_run(PredictiveFailureDetector(CFG), series))
    assert not (p >= 0.7).any()
    # Why the rate is not simply held for the horizon: measured over 10 s, a burst at 0.8 x is
    # taken to last. (Over the default 20 s this series' bursts are averaged out; the learned
    # regression is what keeps it quiet whatever the window.)
    q = _p(_run(_alternative("MeasuredArrivalsDetector")({**CFG, "arrival_window_s": 10}), series))
    assert (q >= 0.7).any()
    r = _p(_run(PredictiveFailureDetector({**CFG, "arrival_window_s": 10}), series))
    assert not (r >= 0.7).any()


def test_no_capacity_forecast_without_the_finished_counter() -> None:
    rate = np.concatenate([np.full(100, 1.0), np.linspace(1.0, 6.0, 300)])
    series = _serve(rate)
    del series["finished"]
    with_cap = _p(_run(PredictiveFailureDetector(CFG), series))
    without = _p(_run(PredictiveFailureDetector({**CFG, "use_capacity": False}), series))
    np.testing.assert_array_equal(with_cap, without)


def test_backlog_released_after_a_frozen_engine_is_no_arrival_rate() -> None:
    # Steady 2 req/s (half the capacity); the engine freezes for 12 s, and the ~24 requests that
    # arrived meanwhile appear at once when it resumes: a burst, not a rising offered load.
    rate = np.full(300, 2.0)
    series = _serve(rate, seed=3, freeze=(150, 162))
    # the measured rate, held for the horizon: the model that would take the burst at its word
    det = _alternative("MeasuredArrivalsDetector")(CFG)
    res = _run(det, series)
    assert not (series["waiting"] >= 2 * LIMIT).any()
    j = res[0].failure_types.index("queue_overload")
    # the capacity signal says nothing until a full arrival window has passed since the freeze
    assert series["waiting"][162] >= 10
    for k in range(150, 162 + 10):
        assert not res[k].precursors["arrivals_over_capacity"][0]
    p = _p(res)
    assert not (p[150:] >= 0.7).any(), np.flatnonzero(p >= 0.7)
    assert res[-1].source[0, j] != 1


def test_capacity_state_resets_on_restart() -> None:
    rate = np.full(200, 2.0)
    series = _serve(rate, seed=4)
    det = PredictiveFailureDetector(CFG)
    _run(det, {k: v[:150] for k, v in series.items()})
    row = det._rows["a"]
    assert det.offered_load.done[row] > 10
    # counters start over (a restart): the learned service time is dropped with the old run
    rest = {k: v[150:] - (v[150] if k in ("finished", "generation_tokens") else 0) for k, v in series.items()}
    rest["preemptions"] = np.zeros(50)
    rest["generation_tokens"] = rest["generation_tokens"] + 1.0
    det.step(1000.0 + 150, ["a"], {k: np.array([v[0]]) for k, v in rest.items()})
    assert det.offered_load.done[row] < 10


def test_extractor_reports_finished_per_step_with_resets() -> None:
    ex = SignalExtractor(FailureCatalog(), 1.0)
    rows = np.array([0])
    seq = [5.0, 7.0, 7.0, 2.0, np.nan, 4.0]
    got = [ex.update(rows, float(k), {"finished": np.array([v])})["finished"][0] for k, v in enumerate(seq)]
    assert np.isnan(got[0]) and got[1:4] == [2.0, 0.0, 2.0] and np.isnan(got[4]) and got[5] == 2.0
