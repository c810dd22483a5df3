"""``vllm-otel demo``: start the stack, drive the scenario with a live view, then read back from
the services what happened and write the report. Exit 0 only when the loop closed."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from vllm_otel.demo.observe import PREDICTED_TYPES, Observer
from vllm_otel.demo.scenario import DeadlineReached, Plan, Scenario, Timeline
from vllm_otel.demo.stack import DemoSettings, DemoStack
from vllm_otel.demo.summary import (THRESHOLD, action_time, closed_loop, failure_onsets, first_crossing,
                                    is_predictive)

__all__ = ["run_demo", "DemoResult"]

RANGE_QUERIES = {
    "waiting": 'sum(vllm:num_requests_waiting{job="vllm"})',
    "running": 'sum(vllm:num_requests_running{job="vllm"})',
    "kv_usage": 'max(vllm:kv_cache_usage_perc{job="vllm"})',
    "stalled": 'max(vllm_otel_engine_stalled{job="vllm"})',
    "ttft_p95": 'histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{job="vllm"}[10s])))',
    "forecast_waiting_p10": 'max(vllm_otel_forecast{job="vllm-otel-forecaster", signal="waiting", quantile="0.1"})',
    "forecast_waiting_p90": 'max(vllm_otel_forecast{job="vllm-otel-forecaster", signal="waiting", quantile="0.9"})',
    "forecast_kv_p10": 'max(vllm_otel_forecast{job="vllm-otel-forecaster", signal="kv_usage", quantile="0.1"})',
    "forecast_kv_p90": 'max(vllm_otel_forecast{job="vllm-otel-forecaster", signal="kv_usage", quantile="0.9"})',
    **{f"p_{f}": f'max(vllm_otel_failure_probability{{job="vllm-otel-forecaster", failure_type="{f}"}})'
       for f in (*PREDICTED_TYPES, "engine_stall")},
    **{f"ttf_{f}": f'min(vllm_otel_time_to_failure_seconds{{job="vllm-otel-forecaster", failure_type="{f}"}})'
       for f in PREDICTED_TYPES},
}


class DemoResult(dict):
    """summary.json's content, plus where the report went."""


def _points(prom: Any, promql: str, start: float, end: float) -> list[tuple[float, float]]:
    data = prom.query_range(promql, start, end, step=1.0)["result"]
    pts = sorted((float(t), float(v)) for s in data for t, v in s["values"])
    return [(t, v) for t, v in pts if v == v]  # NaN (no data) dropped


def _per_second(results: list[tuple[float, Any]], ok: bool, start: float, end: float) -> list[tuple[float, float]]:
    bins: dict[int, int] = {}
    for at, r in results:
        if bool(r.ok) == ok:
            bins[int(at)] = bins.get(int(at), 0) + 1
    return [(float(s), float(bins.get(s, 0))) for s in range(int(start), int(end) + 1)]


def _served_throughout(results: list[tuple[float, Any]], windows: list[tuple[float, float]],
                       stall: tuple[float, float] | None, gap_s: float = 15.0) -> bool:
    """Outside the induced stall, every ``gap_s`` of load had requests answered (successes; a 503
    from an admission limit is an answer too: the client can go elsewhere at once)."""
    answered = sorted(at for at, r in results if r.ok or r.status == 503)
    for a, b in windows:
        if stall is not None:
            a = a if not (stall[0] <= a <= stall[1]) else stall[1]
        t = a
        while t + gap_s <= b:
            if stall is not None and stall[0] - gap_s < t < stall[1]:
                t = stall[1]
                continue
            if not any(t <= x < t + gap_s for x in answered):
                return False
            t += gap_s / 2
    return True


def analyse(stack: DemoStack, tl: Timeline, observer: Observer, load: Any, settings: DemoSettings,
            stall: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[tuple[float, float]]], list[dict[str, Any]]]:
    """(summary, series.json, plot series, actions) from the services' own records."""
    assert stack.prom is not None
    start, end = tl.phases[0]["start"], (tl.ended_at or time.time()) + 2
    series_json = stack.prom._api("query_range", query='{job="vllm"}', start=start, end=end, step=1.0)
    dump = {"status": "success", "data": series_json}
    plots = {k: _points(stack.prom, q, start, end) for k, q in RANGE_QUERIES.items()}
    results = load.snapshot()
    plots["ok_rps"] = _per_second(results, True, start, end)
    plots["err_rps"] = _per_second(results, False, start, end)
    actions = stack.receiver_get("/actions", limit=500)["actions"]

    ramp = tl.phase("ramp") or {"start": end, "end": end}
    steps: dict[str, Any] = {}
    crossings = [(c[0], f, c[1]) for f in PREDICTED_TYPES
                 if (c := first_crossing(plots[f"p_{f}"], THRESHOLD, ramp["start"], ramp["end"]))]
    if crossings:
        at, ftype, p = min(crossings)
        steps["predicted_event"] = {"at": at, "failure_type": ftype, "probability": round(p, 3)}
    onsets = failure_onsets(dump, horizon_s=settings.horizon_s, min_history_s=settings.min_history_s,
                            failure_types=PREDICTED_TYPES, catalog=settings.catalog)
    in_ramp = {f: [t for t in ts if ramp["start"] <= t <= ramp["end"]] for f, ts in onsets.items()}
    pred = steps.get("predicted_event")
    if pred:
        first_fail = (in_ramp.get(pred["failure_type"]) or [None])[0]
        steps["failure"] = {"at": first_fail, "failure_type": pred["failure_type"], "prevented": first_fail is None,
                            "other_failures": {f: ts[:3] for f, ts in in_ramp.items() if ts and f != pred["failure_type"]}}
        steps["predicted"] = (pred if first_fail is None or pred["at"] < first_fail else None)
    ramp_acts = sorted((a for a in actions if is_predictive(a)
                        and (action_time(a, "received_at") or 0) >= ramp["start"] - 1
                        and (action_time(a, "received_at") or 0) <= ramp["end"]), key=lambda a: a["id"])
    if ramp_acts:
        steps["alert_received"] = {"at": action_time(ramp_acts[0], "received_at"),
                                   "alertname": ramp_acts[0]["alert"]["alertname"]}
    ran = [a for a in ramp_acts if a.get("strategy") and action_time(a, "started_at")]
    if ran:
        act = ran[0]
        steps["action_started"] = {"at": action_time(act, "started_at"), "strategy": act["strategy"], "id": act["id"],
                                   "why": act.get("why")}
        if act.get("outcome") == "success":
            steps["verified"] = {"at": action_time(act, "finished_at"), "outcome": act["outcome"],
                                 "detail": act.get("detail")}
        seen = observer.learner_seen.get(act["strategy"])
        if seen is not None:
            steps["learner_recorded"] = {"at": seen, "strategy": act["strategy"]}

    stall_info: dict[str, Any] = {}
    stall_window = None
    if tl.sigstop_at is not None:
        stall_info["sigstop_at"] = tl.sigstop_at
        det = first_crossing(plots["stalled"], 1.0, tl.sigstop_at)
        stall_info["detected_at"] = det[0] if det else None
        restarts = [a for a in actions if a.get("strategy") == "restart_engine"
                    and (action_time(a, "received_at") or 0) >= tl.sigstop_at]
        if restarts:
            r = min(restarts, key=lambda a: a["id"])
            stall_info.update(alertname=r["alert"]["alertname"], alert_received_at=action_time(r, "received_at"),
                              restart_started_at=action_time(r, "started_at"),
                              restart_finished_at=action_time(r, "finished_at"), outcome=r.get("outcome"))
        after = stall_info.get("restart_finished_at") or stall_info.get("restart_started_at")
        ok_after = sorted(at for at, r in results if r.ok and after is not None and at > after)
        stall_info["serving_again_at"] = ok_after[0] if ok_after else None
        stall_window = (tl.sigstop_at, stall_info["serving_again_at"] or end)
    steps["stall"] = stall_info
    steps["stall_detected"] = stall_info.get("detected_at") is not None
    steps["restarted"] = stall_info.get("outcome") == "success"
    steps["serving_again"] = stall_info.get("serving_again_at") is not None
    load_windows = [(p["start"], p["end"]) for p in tl.phases if p["phase"] != "probe" and p.get("end")]
    steps["served_throughout"] = _served_throughout(results, load_windows, stall_window)

    closed, why = closed_loop(steps, stall=stall)
    pa = steps.get("predicted") or {}
    ar, ver, fail = steps.get("alert_received") or {}, steps.get("verified") or {}, steps.get("failure") or {}
    latency = {
        "prediction_to_alert_s": round(ar["at"] - pa["at"], 1) if pa and ar else None,
        "alert_to_verified_s": round(ver["at"] - ar["at"], 1) if ar and ver else None,
        "lead_s": round(fail["at"] - pa["at"], 1) if pa and fail.get("at") else None,
        "stall_to_serving_again_s": (round(stall_info["serving_again_at"] - tl.sigstop_at, 1)
                                     if stall_info.get("serving_again_at") else None),
    }
    summary = {
        "loop_closed": closed, "not_closed_because": why, "threshold": THRESHOLD,
        "load_started_at": start, "ended_at": end, "capacity_rps": tl.capacity_rps,
        "steps": steps, "latency": latency, "phases": tl.phases,
        "failure_onsets": onsets,
        "requests": {"sent": load.sent, "ok": sum(1 for _, r in results if r.ok),
                     "rejected_503": sum(1 for _, r in results if r.status == 503),
                     "failed": sum(1 for _, r in results if not r.ok and r.status != 503)},
        "otlp": {"trace_exports": stack.otlp.accepted_count("traces") if stack.otlp else 0,
                 "metric_exports": stack.otlp.accepted_count("metrics") if stack.otlp else 0,
                 "spans": len(stack.otlp.spans()) if stack.otlp else 0},
    }
    return summary, dump, plots, actions


def _trace() -> list[Any]:
    """The Azure 2023 conversation trace (shipped), from a stretch with a steady arrival rate
    (its first minute is sparse)."""
    from vllm_otel.loadgen.traces import load_trace

    return load_trace("AzureLLMInferenceTrace_conv.csv", start=400, limit=6000)


def _learner_rows(learner: Any) -> list[list[Any]]:
    """GET /learner's per-situation table: (situation, strategy, attempts, successes, estimate)."""
    rows: list[list[Any]] = []
    stats = (learner or {}).get("stats") if isinstance(learner, dict) else None
    for s in stats or []:
        if isinstance(s, dict) and "strategy" in s:
            est = s.get("posterior_mean", s.get("success_rate", "-"))
            if isinstance(s.get("interval"), list) and len(s["interval"]) == 2:
                est = f"{est} (90 %: {s['interval'][0]}-{s['interval'][1]})"
            rows.append([s.get("situation", s.get("context", "-")), s["strategy"], s.get("attempts"),
                         s.get("successes"), est])
    return rows


def run_demo(settings: DemoSettings, plan: Plan, *, duration_s: float, report_dir: Path,
             step: Callable[[str], None], live: Callable[[Observer, list[str]], Any] | None = None) -> DemoResult:
    """Run everything; always stops what it started. ``live(observer, log)`` returns a context
    manager that shows the terminal view (None: no view)."""
    deadline = time.monotonic() + duration_s
    report_dir.mkdir(parents=True, exist_ok=True)
    log: list[str] = []

    def say(msg: str) -> None:
        log.append(f"{time.strftime('%H:%M:%S')} {msg}")
        step(msg)

    requests_ = _trace()
    with ExitStack() as es:
        stack = es.enter_context(DemoStack(settings, say))
        stack.start()
        observer = Observer(stack)
        es.callback(observer.stop)
        observer.start()
        if live is not None:
            es.enter_context(live(observer, log))
        scenario = Scenario(stack, requests_, plan, observer, deadline, say)
        timed_out = False
        try:
            scenario.run()
        except DeadlineReached:
            timed_out = True
            say("--duration reached: stopping")
        time.sleep(2)  # the last scrape and the last poll of the learner
        observer.poll_learner()
        summary, dump, plots, actions = analyse(stack, scenario.timeline, observer, scenario.load, settings,
                                                stall=plan.stall)
        summary["timed_out"] = timed_out
        summary["log"] = log
        learner = observer.latest.learner
    from vllm_otel.demo.report import write_report

    (report_dir / "series.json").write_text(json.dumps(dump))
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(report_dir, summary, plots, _learner_rows(learner), actions)
    return DemoResult(summary, report_dir=str(report_dir))
