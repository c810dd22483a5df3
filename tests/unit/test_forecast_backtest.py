"""query_range parsing, sharding, replay, scoring and the ``vllm-otel backtest`` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from vllm_otel.forecast import cli
from vllm_otel.forecast.backtest import ReplayResult, _runs, calibration, hold_alarms, predict_linear, score
from vllm_otel.forecast.promjson import InputError, in_shard, parse_query_range, parse_shard, shard_index
from vllm_otel.forecast.synthetic import scenario, to_query_range

T0 = 1_700_000_000.0


def _matrix(*series: tuple[dict[str, str], list[tuple[float, str]]]) -> dict:
    return {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": m, "values": [[t, v] for t, v in pts]} for m, pts in series]}}


def _backtest(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["backtest", *argv])
    return args.func(args)


def test_parse_matrix_units_gaps_and_engines() -> None:
    kv = "vllm:kv_cache_usage_perc"
    obj = _matrix(
        ({"__name__": kv, "instance": "a:8000", "engine": "0", "model_name": "m"},
         [(T0, "0.5"), (T0 + 10, "0.6")]),                                  # a gap at T0+5
        ({"__name__": kv, "instance": "b:8000", "engine": "0"}, [(T0 + 5, "NaN"), (T0 + 10, "0.7")]),
        ({"__name__": kv, "instance": "b:8000", "engine": "1"}, [(T0 + 5, "0.2"), (T0 + 10, "0.3")]),
        ({"__name__": "vllm_otel_gpu_temperature_celsius", "instance": "b:8000", "gpu": "0"},
         [(T0 + 10, "70")]),                                                  # no engine: shared
        ({"__name__": "vllm:time_to_first_token_seconds_bucket", "instance": "a:8000", "le": "+Inf"},
         [(T0, "1"), (T0 + 5, "2")]),
        ({"__name__": "vllm:time_to_first_token_seconds_bucket", "instance": "a:8000", "le": "0.5"},
         [(T0, "1"), (T0 + 5, "1")]),
        ({"__name__": "vllm:something_else", "instance": "a:8000"}, [(T0, "1")]),
    )
    f = parse_query_range(obj)
    assert f.step_s == 5.0 and list(f.t - T0) == [0, 5, 10]
    assert f.units == ["a:8000", "b:8000/engine=0", "b:8000/engine=1"]
    assert f.instances == ["a:8000", "b:8000", "b:8000"]
    kvs = f.values["kv_usage"]
    assert np.isnan(kvs[0, 1]) and kvs[0, 2] == 0.6 and np.isnan(kvs[1, 1]) and kvs[2, 1] == 0.2
    assert f.values["gpu_temperature"][1, 2] == 70 and f.values["gpu_temperature"][2, 2] == 70
    les, counts = f.histograms["ttft"]
    assert list(les) == [0.5, np.inf] and counts[0, 1].tolist() == [1, 2]
    resampled = parse_query_range(obj, step=10.0)
    assert list(resampled.t - T0) == [0, 10] and resampled.values["kv_usage"][0, 1] == 0.6


@pytest.mark.parametrize("bad, msg", [
    ([], "JSON object"),
    ({"status": "error", "error": "bad query"}, "status 'error'"),
    ({"data": {"resultType": "vector", "result": []}}, "resultType is 'vector'"),
    ({"data": {"resultType": "matrix", "result": [{"metric": {"__name__": "vllm:num_requests_running"},
                                                   "values": [[1, "x"]]}]}}, "pairs"),
])
def test_bad_input_is_a_clear_error(bad: object, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        parse_query_range(bad)


def test_shards_are_stable_and_cover_everything() -> None:
    names = [f"10.0.0.{i}:8000" for i in range(200)]
    assert shard_index("10.0.0.7:8000", 4) == shard_index("10.0.0.7:8000", 4)  # no per-run salt
    assert shard_index("10.0.0.7:8000", 4) == 1  # pinned: the same on every host and release
    shards = [[n for n in names if in_shard(n, (k, 4))] for k in range(1, 5)]
    assert sorted(sum(shards, [])) == sorted(names) and all(len(s) > 20 for s in shards)
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_predict_linear_and_runs() -> None:
    t = np.arange(10) * 5.0
    y = (2.0 + 0.5 * t)[None, :]
    pl = predict_linear(y, t, window_s=20.0, horizon_s=10.0)
    assert np.isnan(pl[0, 0]) and pl[0, 5] == pytest.approx(2.0 + 0.5 * (25 + 10))
    y[0, 3] = np.nan
    assert predict_linear(y, t, 20.0, 10.0)[0, 4] == pytest.approx(2.0 + 0.5 * 30)
    assert _runs(np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=bool)) == [(1, 2), (5, 5), (7, 7)]
    assert _runs(np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=bool), merge_gap=1) == [(1, 2), (5, 7)]


def _one_unit_result(prob: np.ndarray, sig: np.ndarray, labels: np.ndarray) -> ReplayResult:
    T = len(prob)
    shape = (1, T, 1)
    return ReplayResult(t=T0 + np.arange(T, dtype=float), step_s=1.0, horizon_s=120.0, units=["u"],
                        failure_types=("kv_cache_exhaustion",),
                        probability=prob.reshape(shape).astype(np.float32),
                        time_to_failure=np.full(shape, np.nan, dtype=np.float32),
                        labels=labels.reshape(shape), present=np.ones((1, T), dtype=bool),
                        signal=sig.reshape(shape), threshold=np.full(shape, 0.95))


def test_only_fresh_alarm_episodes_are_credited() -> None:
    """An alarm still on from the previous failure, or begun before the horizon, catches nothing."""
    T = 400
    labels = np.zeros(T, dtype=bool)
    labels[100:111] = labels[300:311] = True
    # detector: warns 10 s ahead of the first failure, then stays on until 200 (lingering: it
    # started before the first failure ended, so it is no warning of the second).
    prob = np.zeros(T)
    prob[90:201] = 0.9
    # the static baseline (0.8 x 0.95 = 0.76): on from 95 through 200, then again from 290.
    sig = np.full(T, 0.5)
    sig[95:201] = 0.9
    sig[100:111] = sig[300:311] = 0.96
    sig[290:300] = 0.9
    rows = {r.method: r for r in score(_one_unit_result(prob, sig, labels), threshold=0.7)}
    det, static = rows["detector"], rows["static"]
    assert (det.events, det.caught, det.median_lead_s) == (2, 1, 10.0)
    assert (static.events, static.caught, static.median_lead_s) == (2, 2, 7.5)  # leads 5 and 10
    # an episode that starts after the first failure but more than the horizon before the
    # second one is not credited either; one that starts inside the horizon is, from its start.
    prob[:] = 0.0
    prob[150:161] = 0.9   # 150 s before the second onset
    prob[250:256] = 0.9   # 50 s before it: a warning, even though it stopped again
    det = {r.method: r for r in score(_one_unit_result(prob, sig, labels), threshold=0.7)}["detector"]
    assert (det.events, det.caught, det.median_lead_s, det.alarms, det.false_alarms) == (2, 1, 50.0, 4, 1)


def test_a_held_alarm_is_scored_as_the_page_an_alert_rule_would_send() -> None:
    """--hold S: a warning that flickers across the threshold is one alarm from its first crossing,
    as an alert rule with keep_firing_for: S fires; the raw steps make it several alarms, and
    the run still on at the onset short."""
    T = 400
    labels = np.zeros(T, dtype=bool)
    labels[200:211] = True
    sig = np.where(labels, 0.96, 0.5)
    prob = np.zeros(T)
    for a in (160, 172, 184, 196):       # on 8 s, off 4 s, from 40 s before the onset
        prob[a:a + 8] = 0.9
    prob[320:325] = 0.9                  # a false alarm after the failure, 5 s long
    raw = {r.method: r for r in score(_one_unit_result(prob, sig, labels))}["detector"]
    held = {r.method: r for r in score(_one_unit_result(prob, sig, labels), hold_s=10.0)}["detector"]
    assert (raw.alarms, raw.false_alarms, raw.caught, raw.median_lead_s) == (5, 1, 1, 40.0)
    assert (held.alarms, held.false_alarms, held.caught, held.median_lead_s) == (2, 1, 1, 40.0)
    assert raw.precision == 0.8 and held.precision == 0.5
    # a 4 s gap is bridged by a hold of 4 s, not of 3
    on = prob >= 0.7
    assert hold_alarms(on[None], 4)[0, 160:204].all()
    assert not hold_alarms(on[None], 3)[0, 160:200].all()
    # the false alarm stays on 10 s longer, and the quiet time in alarm shows it
    assert held.quiet_alarm_share > raw.quiet_alarm_share
    np.testing.assert_array_equal(hold_alarms(on[None], 0), on[None])


def test_an_alarm_that_is_always_on_shows_in_the_quiet_time_share() -> None:
    """Precision counts episodes: an alarm on from start to end is one true alarm (precision 1.00,
    a 100 s "lead"). The quiet-time share (alarming while no failure is under way or within the
    horizon) shows it; a detector that warns 10 s ahead of each failure spends none of it."""
    T = 800
    labels = np.zeros(T, dtype=bool)
    labels[100:111] = labels[400:411] = labels[700:711] = True
    sig = np.where(labels, 0.96, 0.5)
    always = {r.method: r for r in score(_one_unit_result(np.full(T, 0.9), sig, labels))}["detector"]
    assert (always.precision, always.alarms, always.caught) == (1.0, 1, 1)
    assert always.quiet_alarm_share == 1.0
    # Quiet steps are those outside the failures and the 120 s before each onset:
    # 111-279, 411-579 and 711-799, 427 in all. A 100 s false alarm in the first stretch:
    spell = np.zeros(T)
    spell[150:250] = 0.9
    false_alarm = {r.method: r for r in score(_one_unit_result(spell, sig, labels))}["detector"]
    assert (false_alarm.alarms, false_alarm.false_alarms) == (4, 1)   # the three failures alarm too
    assert false_alarm.quiet_alarm_share == pytest.approx(100 / 427)
    warns = np.zeros(T)
    for onset in (100, 400, 700):
        warns[onset - 10:onset] = 0.9
    rows = {r.method: r for r in score(_one_unit_result(warns, sig, labels))}
    det = rows["detector"]
    assert (det.precision, det.caught, det.median_lead_s) == (1.0, 3, 10.0)
    assert det.quiet_alarm_share == 0.0
    # the static baseline (0.76) never fires outside the failures here either
    assert rows["static"].quiet_alarm_share == 0.0


def test_calibration_of_probabilities_and_times_to_failure() -> None:
    """Can the detector be taken at its word? Outcome at a step: a failure begins within the
    horizon (120 steps of 1 s). Failing steps, and steps whose horizon runs past the data without
    a failure, have no outcome and are left out."""
    T = 600
    labels = np.zeros(T, dtype=bool)
    labels[300:311] = True
    sig = np.where(labels, 0.96, 0.5)
    prob = np.zeros(T)
    prob[240:300] = 0.9          # the 60 s before the onset: a failure follows each of them
    prob[100:140] = 0.9          # a false alarm: nothing begins within 120 s of 100-139
    res = _one_unit_result(prob, sig, labels)
    ttf = np.full(T, np.nan)
    ttf[240:300] = 300 - np.arange(240, 300) + 10.0   # always 10 s later than the onset came
    ttf[100:140] = 30.0                                # the false alarm's time: nothing came by it
    ttf[350:360] = 5.0                                 # a time with p = 0, after the failure: none came
    res.time_to_failure[0, :, 0] = ttf
    (c,) = calibration(res, threshold=0.7)
    # known outcomes: 0-299 (a failure within 120 s, or none with the horizon inside the data)
    # and 311-479; 480-599 run past the end with no failure: unknown
    assert c.steps == 300 + (480 - 311)
    positive = 120                                   # steps 180-299 are followed by the onset
    assert c.base_rate == pytest.approx(positive / c.steps)
    assert (c.alarm_steps, c.alarm_hit_rate) == (100, pytest.approx(60 / 100))
    top = c.bins[-1]
    assert (top["steps"], top["mean_p"], top["observed"]) == (100, pytest.approx(0.9), pytest.approx(0.6))
    # 240-299: 0.9, then the onset; 100-139: 0.9, nothing; 180-239: 0, then the onset
    expected = (60 * 0.1 ** 2 + 40 * 0.9 ** 2 + 60 * 1.0 ** 2) / c.steps
    assert c.brier == pytest.approx(expected)
    base = positive / c.steps
    assert c.brier_skill == pytest.approx(1 - expected / (base * (1 - base)))
    assert (c.ttf_steps, c.ttf_median_abs_error_s, c.ttf_sooner_share) == (60, pytest.approx(10.0), 1.0)
    # every step with a time, whatever followed: the failure began by the time said at 240-299 only
    assert (c.ttf_dated_steps, c.ttf_by_share) == (110, pytest.approx(60 / 110))
    # a detector that says 1 exactly when a failure follows, and 0 otherwise, is perfect
    perfect = np.zeros(T)
    perfect[180:300] = 1.0
    (p,) = calibration(_one_unit_result(perfect, sig, labels))
    assert p.brier == 0.0 and p.brier_skill == 1.0 and p.alarm_hit_rate == 1.0
    # nothing forecast: nothing to calibrate
    assert calibration(_one_unit_result(np.full(T, np.nan), sig, labels)) == []


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small query_range dump: one KV ramp, one stall, one healthy instance; a gap, a restart."""
    n = 120
    ramp = scenario("kv_ramp", n, seed=1, onset=50)
    stall = scenario("stall", n, seed=2, onset=90)
    healthy = scenario("steady", n, seed=3)
    healthy["kv_usage"][40:44] = np.nan                       # a scrape gap
    healthy["generation_tokens"][80:] -= healthy["generation_tokens"][79]  # a restart
    healthy["preemptions"][80:] = 0.0
    path = tmp_path_factory.mktemp("bt") / "range.json"
    path.write_text(json.dumps(to_query_range({"ramp:8000": ramp, "stall:8000": stall, "ok:8000": healthy},
                                              t0=T0)))
    return path


def test_backtest_jsonl_and_json_score(recording: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pred.jsonl"
    assert _backtest([str(recording), "--output", str(out), "--score", "--json", "--max-refits", "1",
                      "--shard", "1/1"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert set(lines[0]) == {"t", "instance", "failure_type", "probability", "time_to_failure_seconds"}
    assert {x["instance"] for x in lines} == {"ramp:8000", "stall:8000", "ok:8000"}
    assert min(x["t"] for x in lines) >= T0 + 11 * 5  # too little data at the start: nothing
    assert all(0.0 <= x["probability"] <= 1.0 for x in lines)
    ramp_kv = [x for x in lines if x["instance"] == "ramp:8000" and x["failure_type"] == "kv_cache_exhaustion"]
    first_alarm = next(x["t"] for x in ramp_kv if x["probability"] >= 0.7)
    first_fail = next(x["t"] for x in ramp_kv if x["time_to_failure_seconds"] == 0.0)
    assert first_fail - first_alarm >= 30
    keys = [(x["t"], x["instance"], x["failure_type"]) for x in lines]
    assert len(keys) == len(set(keys))  # one line per step, instance and failure type

    report = json.loads(capsys.readouterr().out)
    rows = {(r["failure_type"], r["method"]): r for r in report["results"]}
    assert {m for _, m in rows} == {"detector", "predict_linear", "static"}
    kv = rows[("kv_cache_exhaustion", "detector")]
    assert kv["events"] == 1 and kv["caught"] == 1 and kv["median_lead_s"] >= 30
    stall = rows[("engine_stall", "detector")]
    assert stall["events"] == 1 and stall["caught"] == 1 and stall["false_alarms"] == 0
    assert rows[("engine_stall", "predict_linear")]["caught"] == 0
    assert report["threshold"] == 0.7 and report["instances"] == 3
    cal = {c["failure_type"]: c for c in report["calibration"]}
    assert cal["kv_cache_exhaustion"]["alarm_steps"] > 0 and cal["kv_cache_exhaustion"]["bins"]


def test_backtest_score_table(recording: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _backtest([str(recording), "--score", "--max-refits", "0"]) == 0
    table = capsys.readouterr().out
    for word in ("kv_cache_exhaustion", "engine_stall", "detector", "predict_linear", "static", "recall",
                 "median lead s", "Brier", "taken at its word"):
        assert word in table
    assert '"probability"' not in table  # with --score and no --output, only the score is printed
    assert _backtest([str(recording), "--score", "--max-refits", "0", "--hold", "30", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hold_s"] == 30


def test_backtest_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _backtest([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vllm-otel backtest: error:") and "not valid JSON" in err and "\n" not in err
    assert _backtest([str(tmp_path / "missing.json")]) == 2
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(_matrix()))
    assert _backtest([str(empty)]) == 2
    assert "no vLLM series" in capsys.readouterr().err
    assert _backtest([str(empty), "--shard", "3/2"]) == 2
    capsys.readouterr()
    assert _backtest([str(empty), "--score", "--hold", "-5"]) == 2
    assert "--hold must be 0 or more seconds" in capsys.readouterr().err


def test_parsed_answer_holds_exactly_the_series_it_was_made_of() -> None:
    """A query_range answer, through JSON text and the parser, gives the very arrays it was built
    from (every value, gap and histogram bucket), so the forecasts from it are the same too."""
    from vllm_otel.forecast.synthetic import SCENARIOS, frame_from_scenarios

    series = {f"host-{i:02d}:8000": scenario(SCENARIOS[i % len(SCENARIOS)], 90, seed=i) for i in range(12)}
    for s in series.values():
        s["kv_usage"][30:35] = np.nan  # a gap: those samples are left out of the answer
    want = frame_from_scenarios(series, t0=T0)
    got = parse_query_range(json.loads(json.dumps(to_query_range(series, t0=T0))))
    assert got.units == sorted(want.units) == want.units
    np.testing.assert_array_equal(got.t, want.t)
    assert set(got.values) == set(want.values)
    for name in want.values:
        np.testing.assert_array_equal(got.values[name], want.values[name])
    np.testing.assert_array_equal(got.histograms["ttft"][0], want.histograms["ttft"][0])
    np.testing.assert_array_equal(got.histograms["ttft"][1], want.histograms["ttft"][1])
