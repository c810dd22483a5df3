"""PredictiveFailureDetector on deterministic synthetic series."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from vllm_otel.forecast.backtest import predict_linear
from vllm_otel.forecast.detector import PredictiveFailureDetector
from vllm_otel.forecast.results import Checkpoint, Prediction, StepResult
from vllm_otel.forecast.stategraph import GraphPrior, StateGraph

STEP = 5.0
# Few candidates and refits keep these tests fast; selection itself is tested in test_forecast_models.
FAST = {"step_s": STEP, "max_refits_per_step": 2,
        "candidates": {"kv_usage": ["damped_holt", "ses"], "waiting": ["damped_holt", "ses"],
                       "memory_fraction": ["holt", "ses"]}}


def _run(det: PredictiveFailureDetector, series: dict[str, np.ndarray], unit: str = "a",
         t0: float = 1000.0) -> list[StepResult]:
    n = len(next(iter(series.values())))
    out = []
    for k in range(n):
        res = det.step(t0 + STEP * k, [unit], {name: np.array([v[k]]) for name, v in series.items()})
        assert res is not None
        out.append(res)
    return out


def _p(results: list[StepResult], failure: str) -> np.ndarray:
    j = results[0].failure_types.index(failure)
    return np.array([r.probability[0, j] for r in results])


def _healthy(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"kv_usage": np.clip(0.4 + rng.normal(0, 0.01, n), 0, 1), "running": np.full(n, 4.0),
            "waiting": np.zeros(n), "generation_tokens": 100.0 * np.arange(n), "preemptions": np.zeros(n)}


def test_kv_ramp_is_predicted_with_lead_time() -> None:
    n = 170
    rng = np.random.default_rng(1)
    series = _healthy(n)
    series["kv_usage"] = np.clip(0.3 + 0.005 * np.arange(n) + rng.normal(0, 0.004, n), 0, 1)
    cross = int(np.argmax(series["kv_usage"] >= 0.95))
    results = _run(PredictiveFailureDetector(FAST), series)
    p = _p(results, "kv_cache_exhaustion")
    first = int(np.argmax(p >= 0.7))
    assert 0 < first < cross
    lead = (cross - first) * STEP
    assert lead >= 30.0
    j = results[0].failure_types.index("kv_cache_exhaustion")
    ttf = results[first].time_to_failure[0, j]
    assert 0 < ttf <= 120.0 and abs(ttf - lead) <= 40.0  # the time to failure is about right
    after = results[cross]
    assert after.probability[0, j] == 1.0 and after.time_to_failure[0, j] == 0.0
    assert not (p[: cross - 40] >= 0.7).any()  # no alarm long before


def test_noisy_flat_series_rarely_alarms_while_predict_linear_does() -> None:
    n = 320
    rng = np.random.default_rng(3)
    series = _healthy(n)
    series["kv_usage"] = np.clip(0.85 + rng.normal(0, 0.025, n), 0, 1)
    assert not (series["kv_usage"] >= 0.95).any()  # never actually fails
    p = _p(_run(PredictiveFailureDetector(FAST), series), "kv_cache_exhaustion")
    ours = int((p >= 0.7).sum())
    t = STEP * np.arange(n)
    linear = predict_linear(series["kv_usage"][None, :], t, window_s=60.0, horizon_s=120.0)[0]
    theirs = int((linear >= 0.95).sum())
    assert ours <= 2
    assert theirs >= 10 and theirs > 3 * ours


def test_counter_reset_on_restart_is_not_a_storm() -> None:
    n = 80
    series = _healthy(n)
    series["preemptions"] = np.where(np.arange(n) < 50, 1000.0, 2.0)  # vLLM restarted at step 50
    series["generation_tokens"] = np.where(np.arange(n) < 50, 1e6 + 100 * np.arange(n), 100.0 * (np.arange(n) - 50))
    det = PredictiveFailureDetector(FAST)
    results = _run(det, series)
    assert [k for k, r in enumerate(results) if r.signals["restarted"][0]] == [50]
    assert max(r.signals["preemptions_window"][0] for r in results[1:]) == 2.0  # not -998, not 1000
    assert not (_p(results, "preemption_storm") >= 0.7).any()
    # The models started over at the restart (the new run is all they have seen).
    assert det.banks["kv_usage"].nobs[det._rows["a"]] == n - 50


def test_too_little_data_then_gaps() -> None:
    det = PredictiveFailureDetector(FAST)
    series = _healthy(40)
    series["kv_usage"][20:23] = np.nan     # a short gap
    series["kv_usage"][26:40] = np.nan     # a long one (70 s > max_gap_s)
    results = _run(det, series)
    j = results[0].failure_types.index("kv_cache_exhaustion")
    has = [bool(np.isfinite(r.forecast_probability[0, j])) for r in results]
    assert all(np.isnan(r.probability).all() for r in results[:11])  # min_points: no prediction
    assert has[15] and has[20] and not has[22] and has[24]  # one missing point is tolerated, two not
    assert not has[30]  # not forecast from stale state
    more = _run(det, _healthy(30, seed=5), t0=1000.0 + 40 * STEP)
    fp = [bool(np.isfinite(r.forecast_probability[0, j])) for r in more]
    assert not fp[5] and fp[20]  # after the long gap the state started over (min_points again)


def test_engine_stall_detected_within_two_scrapes() -> None:
    n = 60
    series = _healthy(n)
    onset = 40  # tokens stop growing from here while 4 requests run
    series["generation_tokens"] = np.where(np.arange(n) < onset, 100.0 * np.arange(n), 100.0 * (onset - 1))
    results = _run(PredictiveFailureDetector(FAST), series)
    p = _p(results, "engine_stall")
    first = int(np.argmax(p >= 0.7))
    label = next(k for k, r in enumerate(results) if r.breached[0, r.failure_types.index("engine_stall")])
    assert results[label].signals["flat_seconds"][0] == 20.0
    assert first <= onset + 2 and first < label  # flat for at most two scrapes, before the 20 s mark
    assert not (p[:onset] >= 0.7).any()
    preds = results[first].predictions()
    stall = next(x for x in preds if x.failure_type == "engine_stall")
    assert "tokens_flat_while_running" in stall.precursors and stall.source == "precursor"
    assert stall.time_to_failure is not None and 0 < stall.time_to_failure <= 2 * STEP


def test_no_prediction_during_warm_up_at_short_steps() -> None:
    """At a 1 s scrape, nothing is predicted before half the horizon of data (not 12 points),
    and a healthy server raises no alarm afterwards (the state graph prior used to)."""
    det = PredictiveFailureDetector({**FAST, "step_s": 1.0})
    assert det.warmup_steps == 60
    n = 150
    series = _healthy(n)
    res = [det.step(1000.0 + k, ["a"], {name: np.array([v[k]]) for name, v in series.items()}) for k in range(n)]
    assert all(np.isnan(r.probability).all() for r in res[:59])
    assert np.isfinite(res[60].probability).any()
    assert max(np.nanmax(r.probability) for r in res[60:]) < 0.7


def test_stall_probability_is_learned_from_flat_spells() -> None:
    """Short flat spells that end on their own teach the detector that one flat scrape is no stall."""
    det = PredictiveFailureDetector({**FAST, "step_s": 1.0})
    K = det.stall.steps
    assert K == 20
    prior = det.stall.probability(np.array([0, 1, 14, 20]))[0]
    assert prior[0] == 0.0 and prior[1] == pytest.approx(0.05) and prior[2] == pytest.approx(0.7)
    assert prior[3] == 1.0
    n = 300
    series = _healthy(n)
    gen = np.cumsum(np.where(np.arange(n) % 10 == 5, 0.0, 100.0))  # a one-scrape pause every 10 s
    series["generation_tokens"] = gen
    for k in range(n):
        det.step(1000.0 + k, ["a"], {name: np.array([v[k]]) for name, v in series.items()})
    learned, steps = det.stall.probability(np.array([1, 2]))
    assert learned[0] < 0.01 < prior[1]  # 30 one-step spells, none became a stall
    assert learned[1] == pytest.approx(prior[1] * 2)  # nothing seen at 2 steps: still the prior
    assert steps[0] == K - 1


def test_early_stalls_of_one_instance_do_not_alarm_the_fleet() -> None:
    """Instance "a" stalls three times in its first two and a half minutes; "b" serves without a
    pause. With no flat spell under way, P(engine_stall) is the fleet's stall rate over the
    horizon: counted from those minutes alone (no prior exposure) it put "b" in alarm; from the
    default prior of ten stall-free horizons it stays low, and "a"'s stalls are still caught."""
    step, n = 1.0, 200
    healthy = _healthy(n)
    stalling = _healthy(n, seed=1)
    k = np.arange(n)
    rate = np.where((k >= 62) & (k < 150) & ((k - 62) % 30 < 22), 0.0, 100.0)
    stalling["generation_tokens"] = np.cumsum(rate)          # flat 22 s from 62, 92 and 122

    def run(**cfg: object) -> tuple[np.ndarray, np.ndarray]:
        det = PredictiveFailureDetector({**FAST, "step_s": step, **cfg})
        res = [det.step(1000.0 + k, ["a", "b"], {name: np.array([stalling[name][k], healthy[name][k]])
                                                  for name in healthy}) for k in range(n)]
        j = res[0].failure_types.index("engine_stall")
        return (np.array([r.probability[0, j] for r in res]), np.array([r.probability[1, j] for r in res]))

    a, b = run()
    _, b_old = run(stall_base_prior_horizons=0.0)
    assert (b_old[146:171] >= 0.7).all(), np.round(b_old[146:171], 2)   # what it did
    assert (b[146:] < 0.3).all(), np.round(b[146:], 2)
    for start in (62, 92, 122):                                         # a's stalls still alarm
        assert (a[start + 2:start + 20] >= 0.7).any()


def test_load_trend_ignores_a_frozen_engine() -> None:
    """After a freeze, the backlog flooding in is no trend: the fit starts when the engine moves."""
    step, n = 1.0, 240
    rng = np.random.default_rng(3)
    series = _healthy(n)
    series["kv_usage"] = np.clip(0.25 + rng.normal(0, 0.03, n), 0, 1)
    series["kv_usage"][170:] = np.clip(0.6 + rng.normal(0, 0.03, n - 170), 0, 1)  # backlog after resume
    gen = 100.0 * np.arange(n)
    gen[130:170] = gen[129]                                                   # frozen 40 s
    series["generation_tokens"] = gen
    det = PredictiveFailureDetector({**FAST, "step_s": step})
    res = [det.step(1000.0 + k, ["a"], {name: np.array([v[k]]) for name, v in series.items()}) for k in range(n)]
    j = res[0].failure_types.index("kv_cache_exhaustion")
    p = np.array([r.probability[0, j] for r in res])
    assert not (p[60:] >= 0.7).any()
    # the same jump without the freeze before it reads as a steep rise
    series["generation_tokens"] = 100.0 * np.arange(n)
    det = PredictiveFailureDetector({**FAST, "step_s": step})
    res = [det.step(1000.0 + k, ["a"], {name: np.array([v[k]]) for name, v in series.items()}) for k in range(n)]
    assert max(r.probability[0, j] for r in res[170:200]) >= 0.7


def test_a_repeated_scrape_does_not_blank_the_load_trend() -> None:
    """At a 1 s scrape under load, tokens now and then read flat for one step (a missed or
    repeated scrape). That is no frozen engine: the rise before it still counts, and the warning
    goes on. Seen on a recorded kv_ramp_large, where one such step 57 s before an exhaustion
    switched the trend off for the next 30 s."""
    step, n = 1.0, 200
    rng = np.random.default_rng(4)
    series = _healthy(n)
    kv = np.full(n, 0.2)
    kv[90:] = np.minimum(0.2 + 0.008 * np.arange(n - 90), 1.0)      # rises from t=90, full at t=184
    series["kv_usage"] = np.clip(kv + rng.normal(0, 0.02, n), 0, 1)
    gen = 100.0 * np.arange(n)
    gen[150] = gen[149]                                             # one repeated sample, KV 0.68
    series["generation_tokens"] = gen
    cross = int(np.argmax(series["kv_usage"] >= 0.95))

    def p(**cfg: object) -> np.ndarray:
        det = PredictiveFailureDetector({**FAST, "step_s": step, "use_state_graph": False, **cfg})
        res = [det.step(1000.0 + k, ["a"], {name: np.array([v[k]]) for name, v in series.items()})
               for k in range(n)]
        return _p(res, "kv_cache_exhaustion")

    now, before = p(), p(trend_freeze_s=0.0)   # 0: every flat step cuts the history, as before
    assert (now[151:cross] >= 0.7).all(), np.round(now[151:cross], 2)
    # the old cut: the alarm (on since t=139) drops at the repeated sample and stays off 12 s
    assert (now[139:151] >= 0.7).all() and not (before[151:163] >= 0.7).any()
    assert not (now[:110] >= 0.7).any()


def test_memory_steady_slope_precursor() -> None:
    n = 150
    rng = np.random.default_rng(2)
    series = _healthy(n)
    used = 0.5 + 0.004 * np.arange(n) + rng.normal(0, 0.001, n)
    series["gpu_memory_used"], series["gpu_memory_total"] = used * 80e9, np.full(n, 80e9)
    results = _run(PredictiveFailureDetector(FAST), series)
    frac = np.array([r.signals["memory_fraction"][0] for r in results])
    cross = int(np.argmax(frac >= 1.0))
    p = _p(results, "memory_exhaustion")
    first = int(np.argmax(p >= 0.7))
    assert 0 < first and (cross - first) * STEP >= 30
    pred = next(x for x in results[first].predictions() if x.failure_type == "memory_exhaustion")
    assert "memory_steady_slope" in pred.precursors


def test_analyze_checkpoint_spec_api() -> None:
    det = PredictiveFailureDetector({"step_s": STEP, "max_refits_per_step": 0})
    preds: list[Prediction] = []
    for k in range(20):
        samples = [("vllm:kv_cache_usage_perc", {"engine": "0"}, 0.5 + 0.001 * k),
                   ("vllm:num_requests_running", {}, 3.0), ("vllm:num_requests_waiting", {}, 0.0),
                   ("vllm:generation_tokens_total", {}, 50.0 * k),
                   ("vllm:time_to_first_token_seconds_bucket", {"le": "1.0"}, 2.0 * k),
                   ("vllm:time_to_first_token_seconds_bucket", {"le": "+Inf"}, 2.0 * k)]
        preds = det.analyze_checkpoint(Checkpoint.from_samples("host:8000", 100.0 + STEP * k, samples))
        if k < 11:
            assert preds == []  # too little data
    assert preds and all(isinstance(p, Prediction) for p in preds)
    kinds = {p.failure_type for p in preds}
    assert {"kv_cache_exhaustion", "engine_stall", "ttft_slo_breach"} <= kinds
    kv = next(p for p in preds if p.failure_type == "kv_cache_exhaustion")
    assert kv.probability < 0.1 and kv.time_to_failure is None and kv.instance == "host:8000"
    assert "limit_admission" in kv.recommended_actions
    assert set(kv.to_dict()) >= {"failure_type", "probability", "time_to_failure_seconds", "recommended_actions"}
    # A mapping works too (what a lifecycle tracker or a JSON message would hand over).
    again = det.analyze_checkpoint({"instance": "host:8000", "timestamp": 100.0 + STEP * 20,
                                    "values": {"kv_usage": 0.99, "running": 3, "waiting": 0}})
    assert next(p for p in again if p.failure_type == "kv_cache_exhaustion").probability == 1.0


def test_instances_appear_and_disappear() -> None:
    det = PredictiveFailureDetector({**FAST, "forget_after_s": 30.0})
    a, b = _healthy(10), _healthy(10, seed=1)
    for k in range(10):
        det.step(STEP * k, ["a", "b"], {n: np.array([a[n][k], b[n][k]]) for n in a})
    assert set(det.instances) == {"a", "b"}
    for k in range(10, 20):  # b is gone; c appears
        det.step(STEP * k, ["a", "c"], {n: np.array([a[n][k % 10], b[n][k % 10]]) for n in a})
    assert set(det.instances) == {"a", "c"}
    assert len(det._rows) == 2 and len(set(det._rows.values())) == 2


def test_deterministic() -> None:
    series = _healthy(45, seed=4)
    series["kv_usage"] = np.linspace(0.5, 0.99, 45)
    cfg = {**FAST, "max_refits_per_step": 1}
    p1 = _p(_run(PredictiveFailureDetector(cfg), series), "kv_cache_exhaustion")
    p2 = _p(_run(PredictiveFailureDetector(cfg), series), "kv_cache_exhaustion")
    np.testing.assert_array_equal(p1, p2)


def test_state_graph_learns_transitions_and_reach() -> None:
    names = ("no_data", "idle", "serving", "queueing", "kv_high", "kv_cache_exhaustion")
    g = StateGraph(names, horizon_steps=3, prior=GraphPrior(stay=1.0, move=0.01, precursor=0.0))
    before = g.transition_matrix()[2, 3]
    s, q, k, f = (g.index[x] for x in ("serving", "queueing", "kv_high", "kv_cache_exhaustion"))
    g.observe(np.array([s] * 50), np.array([q] * 50))
    assert g.transition_matrix()[s, q] > 0.9 > before  # learned, not hard-coded
    g.observe(np.array([k] * 30 + [k] * 10), np.array([f] * 30 + [s] * 10))
    m = g.transition_matrix()
    prob, steps = g.predict(np.array([k, g.index["idle"], -1]))
    fi = g.failures.index("kv_cache_exhaustion")
    # Hand computation of reaching F within 3 steps from kv_high, F absorbing.
    qf = m.copy()
    qf[f] = 0.0
    qf[f, f] = 1.0
    expected = np.linalg.matrix_power(qf, 3)[k, f]
    assert prob[0, fi] == pytest.approx(expected) and prob[0, fi] > 0.7 and steps[0, fi] == 1
    assert prob[1, fi] < 0.1 and np.isnan(prob[2, fi])
    saved = g.to_dict()
    g2 = StateGraph(names, horizon_steps=3, prior=GraphPrior(stay=1.0, move=0.01, precursor=0.0))
    g2.load_dict(saved)
    np.testing.assert_allclose(g2.transition_matrix(), m)


def test_the_graph_base_rate_alone_raises_no_alarm() -> None:
    """An instance that exhausted its KV cache every minute, then serves calmly at 15 %: from
    "serving" the fleet-wide graph only knows that serving used to end in exhaustion (here within
    the horizon every time), which is no forecast for this instance now. Counted fleet-wide, one
    flapping instance would otherwise put every serving instance of the fleet in alarm. (From
    states that carry evidence, precursors, flat spells, other failures, the graph is unchanged.)"""
    rng = np.random.default_rng(5)
    kv: list[float] = []
    for _ in range(12):  # 60 s serving at 0.3, 15 s exhausted
        kv += [*(0.3 + rng.normal(0, 0.01, 12)), 0.97, 0.97, 0.97]
    calm_from = len(kv)
    kv += list(0.15 + rng.normal(0, 0.01, 40))
    series = _healthy(len(kv))
    series["kv_usage"] = np.clip(np.array(kv), 0, 1)
    settled = slice(calm_from + 10, None)  # the trend over the last failures has faded by then

    p = _p(_run(PredictiveFailureDetector(FAST), series), "kv_cache_exhaustion")
    assert (p[settled] < 0.5).all(), p[settled]
    # The same detector with the base rate let through alarms for the whole calm (what it did).
    p_base = _p(_run(PredictiveFailureDetector({**FAST, "graph_silent_states": []}), series),
                "kv_cache_exhaustion")
    assert (p_base[settled] >= 0.7).all(), p_base[settled]
    with pytest.raises(ValueError, match="graph_silent_states: unknown states"):
        PredictiveFailureDetector({**FAST, "graph_silent_states": ["serve"]})


def test_a_lingering_windowed_failure_raises_no_alarm_of_another() -> None:
    """A preemption storm (more than 5 preemptions in 60 s) stays a failure state for the whole
    window after the last preemption, like a TTFT-SLO breach over its 60 s window. In this history
    every storm came just before the KV cache filled, so the graph learned storm -> exhaustion;
    but a storm state 50 s after a one-off burst, with the KV cache calm at 15 %, says nothing about
    the cache now. (Measured on the recorded queue_ramp: a TTFT breach lingering after a load swell
    held P(queue_overload) at 0.74 for 22 s with no request waiting.)"""
    rng = np.random.default_rng(7)
    kv: list[float] = []
    pre: list[float] = []
    total = 0.0
    for _ in range(10):  # 60 s serving at 0.3; a storm with KV rising; 60 s exhausted; 90 s calm
        kv += list(0.3 + rng.normal(0, 0.01, 12))
        pre += [total] * 12
        for v in (0.5, 0.7, 0.85):
            total += 4.0
            kv.append(v)
            pre.append(total)
        kv += [0.97] * 12 + list(0.2 + rng.normal(0, 0.01, 18))
        pre += [total] * 30
    total += 12.0  # a one-off burst of preemptions; the cache stays calm
    burst = len(kv)
    kv += list(0.15 + rng.normal(0, 0.01, 14))
    pre += [total] * 14
    series = _healthy(len(kv))
    series["kv_usage"] = np.clip(np.array(kv), 0, 1)
    series["preemptions"] = np.array(pre)
    lingering = slice(burst + 2, burst + 11)  # the storm is still "on" (60 s window)

    res = _run(PredictiveFailureDetector(FAST), series)
    j = res[0].failure_types.index("preemption_storm")
    assert all(r.breached[0, j] for r in res[lingering])  # the storm state does linger
    p = _p(res, "kv_cache_exhaustion")
    assert (p[lingering] < 0.5).all(), p[lingering]
    old = {**FAST, "graph_silent_states": ["no_data", "idle", "serving"]}  # the default before
    p_old = _p(_run(PredictiveFailureDetector(old), series), "kv_cache_exhaustion")
    assert (p_old[lingering] >= 0.7).all(), p_old[lingering]


def test_the_alarm_ends_with_the_failure_it_warned_of() -> None:
    """KV usage climbs into exhaustion at a 1 s scrape, then the load goes and the cache empties.
    The rise ended in its failure, so the trend is fit only on what came after: the alarm ends
    within a block (5 s) of the failure. A line fit through the rise kept the alarm on while the
    cache sat at 10 % (15-60 s after each recorded exhaustion)."""
    rng = np.random.default_rng(3)
    kv = list(0.3 + rng.normal(0, 0.02, 90)) + list(np.linspace(0.3, 0.9, 60) + rng.normal(0, 0.02, 60))
    kv += [0.97, 0.98, 0.9, 0.96, 0.97, 0.91, 0.89, 0.97, 0.98, 0.97]  # failing, bouncing around 0.95
    end = len(kv) - 1
    kv += list(0.1 + rng.normal(0, 0.02, 40))
    series = _healthy(len(kv))
    series["kv_usage"] = np.clip(np.array(kv), 0, 1)
    after = slice(end + 6, end + 40)
    cfg = {**FAST, "step_s": 1.0}

    def run(det: PredictiveFailureDetector) -> np.ndarray:
        return _p([det.step(1000.0 + k, ["a"], {n: np.array([v[k]]) for n, v in series.items()})
                   for k in range(len(kv))], "kv_cache_exhaustion")

    p = run(PredictiveFailureDetector(cfg))
    assert (p[end - 9:end + 1] >= 0.7).all(), p[end - 9:end + 1]  # no flapping while it fails
    assert (p[after] < 0.7).all(), p[after]
    p_line = run(PredictiveFailureDetector({**cfg, "trend_after_failure_only": False}))
    assert (p_line[end + 6:end + 9] >= 0.7).all(), p_line[after]  # still alarming 6-8 s after


def test_unfit_series_borrow_fleet_parameters() -> None:
    from vllm_otel.forecast.statespace import Innovations

    det = PredictiveFailureDetector({**FAST, "pool_min_fits": 3})
    units = [f"i{k}" for k in range(5)]
    for k in range(3):
        det.step(STEP * k, units, {"kv_usage": np.full(5, 0.5)}, refit=False)
    bank = det.banks["kv_usage"]
    rows = np.array([det._rows[u] for u in units])
    fitted = Innovations(alpha=0.8, beta=0.1, d=0.9, phi=0.9)
    for r in rows[:3]:
        bank.set_model(int(r), fitted, 0.5, 0.0, 1e-4, model=det._model_names.index("damped_holt"), fitted_at=0.0)
    det.refitter.pool_defaults(rows)
    assert bank.params(int(rows[4])) == Innovations(alpha=0.8, beta=0.1, d=0.9, phi=0.9, c=0.0)
    det.step(STEP * 3, ["new"], {"kv_usage": np.array([0.5])}, refit=False)
    assert bank.params(det._rows["new"]).alpha == 0.8  # new instances start from them too


def _kv_probability(series: dict[str, np.ndarray], **cfg: object) -> np.ndarray:
    det = PredictiveFailureDetector({**FAST, "step_s": 1.0, "use_state_graph": False, **cfg})
    n = len(series["kv_usage"])
    res = [det.step(1000.0 + k, ["a"], {name: np.array([v[k]]) for name, v in series.items()}) for k in range(n)]
    return _p(res, "kv_cache_exhaustion")


def _bursty_kv(seed: int, n: int = 700) -> dict[str, np.ndarray]:
    """KV usage rising slowly (0.25 -> 0.6 over n 1 s steps) with a 3-step burst of +0.4 every 20 steps."""
    rng = np.random.default_rng(seed)
    series = _healthy(n)
    kv = np.linspace(0.25, 0.6, n) + rng.normal(0, 0.03, n)
    for k in range(0, n, 20):
        kv[k:k + 3] += 0.4
    series["kv_usage"] = np.clip(kv, 0, 1)
    return series


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_tail_warns_of_bursts_a_gaussian_tail_misses(seed: int) -> None:
    """KV usage rising slowly with bursts on top (a few long requests landing together, as on
    the real vLLM): the burst that first crosses 0.95 is warned of from the bursts seen before
    it; a Gaussian tail around the same trend line says < 0.7 until the crossing."""
    series = _bursty_kv(seed)
    cross = int(np.argmax(series["kv_usage"] >= 0.95))
    learned = _kv_probability(series, trend_tail="learned")
    gaussian = _kv_probability(series, trend_tail="gaussian")
    assert (learned[:cross] >= 0.7).any(), float(np.nanmax(learned[:cross]))
    assert not (gaussian[:cross] >= 0.7).any()
    assert not (learned[:cross - 120] >= 0.7).any()  # and not long before


def test_learned_tail_adds_no_alarm_to_gaussian_noise() -> None:
    n = 600
    series = _healthy(n)
    series["kv_usage"] = np.clip(0.45 + np.random.default_rng(4).normal(0, 0.08, n), 0, 1)
    assert np.nanmax(_kv_probability(series, trend_tail="learned")) < 0.05


def test_time_to_failure_agrees_with_the_probability() -> None:
    """A user paged with "P = 0.9 within 120 s" needs a time to go with it. On a bursty KV series
    the trend's probability comes from the bursts reaching 0.95, not from its mean line (which
    stays below): the time to failure is when a crossing has become as likely as not, so every
    alarm carries one. (Before, it was where the mean line crossed: here never, so no alarm had a
    time.)"""
    series = _bursty_kv(0)
    cross = int(np.argmax(series["kv_usage"] >= 0.95))
    det = PredictiveFailureDetector({**FAST, "step_s": 1.0, "use_state_graph": False})
    res = [det.step(1000.0 + k, ["a"], {name: np.array([v[k]]) for name, v in series.items()})
           for k in range(cross)]
    j = res[0].failure_types.index("kv_cache_exhaustion")
    p = np.array([r.probability[0, j] for r in res])
    ttf = np.array([r.time_to_failure[0, j] for r in res])
    alarm = np.flatnonzero(p >= 0.7)
    assert len(alarm), float(np.nanmax(p))
    assert np.isfinite(ttf[alarm]).all() and (ttf[alarm] <= 120.0).all(), ttf[alarm]
    likely = p >= 0.5                          # as likely as not: a time within the horizon
    assert np.isfinite(ttf[likely]).all()


def _alternative(name: str) -> type[PredictiveFailureDetector]:
    """A detector with a precursor model's alternative, from benchmarks/precursor_alternatives.py
    (not shipped: it lost to the model the detector uses)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "precursor_alternatives.py"
    spec = importlib.util.spec_from_file_location("precursor_alternatives", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _preemption_probability(counter: np.ndarray, detector: type[PredictiveFailureDetector] = PredictiveFailureDetector
                            ) -> tuple[np.ndarray, list[StepResult]]:
    series = _healthy(len(counter))
    series["preemptions"] = counter
    results = _run(detector(FAST), series)
    return _p(results, "preemption_storm"), results


def test_preemptions_ageing_out_of_the_window_are_no_storm_coming() -> None:
    """Five preemptions in one burst, then none: the window holds 5 (a storm is more than 5 in
    60 s) until they age out. With every quiet scrape a sixth is less likely, and once the burst
    has left the window there is nothing to add to. A model of the windowed count itself (the
    generic forecast, benchmarks/precursor_alternatives.py) went the other way: up as the burst
    aged, and up again when the count fell to 0."""
    counter = np.zeros(60)
    counter[30:] = 5.0
    p, results = _preemption_probability(counter)
    j = results[0].failure_types.index("preemption_storm")
    assert not any(r.breached[0, j] for r in results)
    assert p[30] >= 0.5                                  # just after the burst: one more is a storm
    assert (np.diff(p[30:]) <= 1e-12).all() and p[30] > p[35] > p[40]
    assert (p[42:] == 0.0).all()                         # aged out (12 scrapes of 5 s)
    old, _ = _preemption_probability(counter, _alternative("WindowForecastDetector"))
    assert not (np.diff(old[30:]) <= 1e-12).all()


def test_a_steady_trickle_of_preemptions_is_warned_of_before_the_storm() -> None:
    counter = np.zeros(60)
    counter[30:] = np.arange(1, 31)                      # one more at every scrape (5 s) from step 30
    p, results = _preemption_probability(counter)
    j = results[0].failure_types.index("preemption_storm")
    onset = next(k for k, r in enumerate(results) if r.breached[0, j])
    assert onset == 35                                   # six in the window: more than five
    first = int(np.argmax(p >= 0.7))
    assert 30 <= first and (onset - first) * STEP >= 15
    ttf = results[first].time_to_failure[0, j]
    assert 0 < ttf <= 60


def test_units_in_any_row_order_get_the_same_predictions() -> None:
    """A detector whose units come in a new order each step (state read row by row) predicts,
    to the last bit, what one fed the same units in one steady order (state read as one block)."""
    from vllm_otel.forecast.synthetic import SCENARIOS, frame_from_scenarios, scenario

    n, join = 15, 30
    frame = frame_from_scenarios({f"u{i:02d}": scenario(SCENARIOS[i % len(SCENARIOS)], 120, seed=i)
                                  for i in range(n)})
    for arr in frame.values.values():
        arr[::5, 50:60] = np.nan  # gaps: some units miss steps
    steady = PredictiveFailureDetector(FAST)
    shuffled = PredictiveFailureDetector(FAST)
    rng = np.random.default_rng(0)
    for k in range(len(frame.t)):
        sel = np.arange(n) if k >= join else np.arange(n - 3)  # 3 join later, at other ring positions
        # New units are met in the same order by both (it orders refits of equal merit).
        perm = np.arange(len(sel)) if k in (0, join) else rng.permutation(len(sel))
        refit = k % 10 == 0
        values, hists = frame.at(k, sel)
        a = steady.step(float(frame.t[k]), [frame.units[i] for i in sel], values, hists, refit=refit)
        values, hists = frame.at(k, sel[perm])
        b = shuffled.step(float(frame.t[k]), [frame.units[i] for i in sel[perm]], values, hists, refit=refit)
        assert a is not None and b is not None
        back = np.argsort(perm)  # b's rows in a's order
        for got, want in ((b.probability[back], a.probability), (b.time_to_failure[back], a.time_to_failure),
                          (b.source[back], a.source), (b.states[back], a.states)):
            np.testing.assert_array_equal(got, want)
    assert steady.refits > 0
    assert np.isfinite(a.probability).sum() > n  # the comparison covered real predictions


def test_memory_slope_is_the_same_with_or_without_a_gappy_row_beside() -> None:
    """Rows with every point take a shortcut (shared x statistics); one row with a gap beside them
    sends all through the general sums. Both give the same numbers for the full rows."""
    from vllm_otel.forecast.precursors.memory import MemoryTrend
    from vllm_otel.forecast.statespace import Innovations, InnovationsBank

    rng = np.random.default_rng(3)
    bank = InnovationsBank(Innovations(0.3, 0.02, 1.0, 0.95, 0.0), history=120)
    rows = np.arange(6)
    for k in range(90):
        y = 0.5 + 0.004 * k * np.arange(1, 7) / 6 + rng.normal(0, 0.002, 6)
        if k >= 70:
            y[5] = np.nan if k % 4 == 0 else y[5]  # the last row has gaps
        bank.update(rows, y)
    model = MemoryTrend(points=60, r2=0.9, horizon_steps=24, step_s=5.0)
    full = model.probability(rows[:5], bank)
    mixed = model.probability(rows, bank)
    for a, b in zip(full, mixed):
        np.testing.assert_array_equal(a, b[:5])
    assert full[0].any() and np.isfinite(full[1]).any()  # the climbs are seen, with a probability
