"""The demo's bookkeeping, without services: how it decides that the loop closed, how it reads
the learner's answer, and how its load follows the rate it is given."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_otel.demo.load import _Cursor
from vllm_otel.demo.run import _served_throughout
from vllm_otel.demo.summary import action_time, closed_loop, first_crossing, is_predictive, learner_attempts
from vllm_otel.loadgen.traces import TraceRequest, load_trace


def _all_steps() -> dict:
    return {"predicted": {"at": 1.0}, "alert_received": {"at": 2.0}, "action_started": {"at": 3.0},
            "verified": {"at": 4.0}, "learner_recorded": {"at": 5.0}, "served_throughout": True,
            "stall_detected": True, "restarted": True, "serving_again": True}


def test_the_loop_closes_only_when_every_step_happened_and_says_which_did_not() -> None:
    assert closed_loop(_all_steps(), stall=True) == (True, None)
    for missing, words in [("predicted", "predicted"), ("verified", "verify"), ("learner_recorded", "learner"),
                           ("served_throughout", "answer requests"), ("restarted", "restarted")]:
        steps = _all_steps()
        steps[missing] = None if missing != "served_throughout" else False
        closed, why = closed_loop(steps, stall=True)
        assert not closed and words in why
    steps = _all_steps()
    steps["restarted"] = False
    assert closed_loop(steps, stall=False) == (True, None)  # --no-stall: the stall steps are not asked for


def test_learner_attempts_are_counted_whatever_the_answer_looks_like() -> None:
    flat = {"learner": "RuleBasedLearner", "stats": [
        {"strategy": "lower_queue_limits", "situation": "queue_overload", "attempts": 2, "successes": 2},
        {"strategy": "restart_engine", "situation": "VllmEngineStalled", "attempts": 1, "successes": 1}]}
    nested = {"learner": "bandit", "contexts": {"queue_overload|running": {"arms": [
        {"strategy": "lower_queue_limits", "attempts": 3}]}}}
    assert learner_attempts(flat, "lower_queue_limits") == 2
    assert learner_attempts(nested, "lower_queue_limits") == 3
    assert learner_attempts(flat, "reduce_batch_size") == 0
    assert learner_attempts({"stats": None}, "x") == 0


def test_audit_trail_times_and_predictive_alerts() -> None:
    act = {"alert": {"alertname": "VllmOtelFailurePredicted", "received_at": "2026-12-06T10:00:00Z"},
           "timings": {"started_at": "2026-12-06T10:00:02.500000Z", "finished_at": None}}
    assert action_time(act, "started_at") - action_time(act, "received_at") == pytest.approx(2.5)
    assert action_time(act, "finished_at") is None
    assert is_predictive(act) and not is_predictive({"alert": {"alertname": "VllmEngineStalled"}})


def test_first_crossing_looks_only_inside_the_window() -> None:
    pts = [(0.0, 0.9), (10.0, 0.2), (20.0, 0.75), (30.0, 0.95)]
    assert first_crossing(pts, 0.7, since=5.0) == (20.0, 0.75)
    assert first_crossing(pts, 0.7, since=5.0, until=15.0) is None
    assert first_crossing(pts, 0.99, since=0.0) is None


def test_the_load_cursor_keeps_the_trace_pattern_and_wraps_around() -> None:
    reqs = [TraceRequest(offset_s=t, input_tokens=10, output_tokens=5) for t in (0.0, 0.5, 0.6, 2.0)]
    c = _Cursor(reqs)
    assert c.rate == pytest.approx(4 / 2.001)
    first = c.take(1.0)
    assert [r.offset_s for r in first] == pytest.approx([0.0, 0.5, 0.6])
    # [1.0, 2.5): the last request, then the trace starts over (its first request at 2.001)
    assert [r.offset_s for r in c.take(1.5)] == pytest.approx([1.0, 1.001])
    assert [r.offset_s for r in c.take(1.0)] == pytest.approx([0.001, 0.101])  # 2.501, 2.601


def test_the_shipped_trace_gives_the_rate_asked_for() -> None:
    c = _Cursor(load_trace("AzureLLMInferenceTrace_conv.csv", start=400, limit=6000))
    rate = 3.0
    sent = sum(len(c.take(rate / c.rate)) for _ in range(120))
    assert 0.8 * rate * 120 < sent < 1.2 * rate * 120


def _result(at: float, ok: bool = True, status: int | None = 200) -> tuple[float, SimpleNamespace]:
    return at, SimpleNamespace(ok=ok, status=status)


def test_served_throughout_allows_the_stall_and_503s_but_not_a_silent_gap() -> None:
    windows = [(0.0, 60.0)]
    steady = [_result(float(t)) for t in range(0, 61, 2)]
    assert _served_throughout(steady, windows, stall=None)
    shed = [_result(float(t), ok=False, status=503) for t in range(0, 61, 2)]
    assert _served_throughout(shed, windows, stall=None)  # an admission limit's 503 is an answer
    gap = [r for r in steady if not 20 <= r[0] <= 45]
    assert not _served_throughout(gap, windows, stall=None)
    assert _served_throughout(gap, windows, stall=(20.0, 45.0))  # the induced stall is allowed
    refused = [_result(float(t), ok=False, status=None) for t in range(0, 61, 2)]
    assert not _served_throughout(refused, windows, stall=None)


def test_stopping_a_load_that_never_started_is_quiet() -> None:
    # Ctrl-C while the services start stops the scenario before its load began: that must end as
    # an interrupt (exit 130), not as an error from stopping what never ran.
    from vllm_otel.demo.load import LoadDriver

    LoadDriver(url="http://127.0.0.1:9", requests=load_trace("AzureLLMInferenceTrace_conv.csv", limit=5)).stop(timeout_s=0.1)
