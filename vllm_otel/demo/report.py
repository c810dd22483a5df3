"""The demo's report: ``report.html`` (one self-contained page, plots as inline SVG drawn with
matplotlib), ``summary.json`` (written by the caller) and ``series.json``.

Each plot is a real series from the run's Prometheus, with the moments that matter drawn on it:
the probability crossing the threshold, the alert reaching the receiver, the action's start and
verification, the SIGSTOP and the restart.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["write_report", "PLOTS"]

Points = list[tuple[float, float]]

# (title, y label, [(legend, key in `series`)]); keys are filled by the caller from query_range.
PLOTS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests in vLLM", "requests", [("waiting", "waiting"), ("running", "running")]),
    ("Predicted failure probability", "probability", [("queue overload", "p_queue_overload"),
                                                      ("TTFT SLO breach", "p_ttft_slo_breach"),
                                                      ("KV-cache exhaustion", "p_kv_cache_exhaustion"),
                                                      ("engine stall", "p_engine_stall")]),
    ("Time to failure", "seconds", [("queue overload", "ttf_queue_overload"),
                                    ("TTFT SLO breach", "ttf_ttft_slo_breach")]),
    ("Time to first token, p95 over 10 s", "seconds", [("TTFT p95", "ttft_p95")]),
    ("KV-cache usage", "fraction", [("KV usage", "kv_usage")]),
    ("Engine stalled (watchdog)", "0/1", [("stalled", "stalled")]),
    ("Requests answered per second (load generator)", "requests/s", [("ok", "ok_rps"), ("errors", "err_rps")]),
]

# The steps are drawn the same way on every plot (grey vertical lines, labelled on the first);
# the signals take the colours, so a step never reads as a series.
_MARK_STYLE = {"predicted": "-", "alert_received": "--", "action_started": "-.", "verified": "-",
               "failure": ":", "sigstop": "-", "restarted": "--", "serving_again": ":"}
_SERIES_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
_GAP_S = 3.0  # no sample for longer than this (the server was down): the line breaks


def _with_gaps(pts: Points) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for i, (t, v) in enumerate(pts):
        if i and t - pts[i - 1][0] > _GAP_S:
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs.append(t)
        ys.append(v)
    return xs, ys


# A plot's forecast band: the forecaster's 0.1-0.9 quantiles of the signal at its horizon, drawn
# at the time the forecast was made (what it expected the signal to be that far ahead).
_BANDS = {"Requests in vLLM": ("forecast_waiting_p10", "forecast_waiting_p90", "waiting forecast, p10-p90 at the horizon"),
          "KV-cache usage": ("forecast_kv_p10", "forecast_kv_p90", "KV forecast, p10-p90 at the horizon")}


def _svg(title: str, ylabel: str, lines: Sequence[tuple[str, Points]], t0: float,
         marks: Mapping[str, float], phases: Sequence[Mapping[str, Any]], threshold: float | None,
         label_marks: bool = False, band: tuple[Points, Points, str] | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 2.6), dpi=100)
    shade = {"ramp": "#fde9d9", "stall": "#e8e8f8", "calm": "#eef7ee", "recover": "#eef7ee", "probe": "#f4f4f4"}
    for ph in phases:
        if ph.get("start") and ph.get("end"):
            ax.axvspan(ph["start"] - t0, ph["end"] - t0, color=shade.get(ph["phase"], "#f8f8f8"), zorder=0)
    drawn = False
    if band is not None and band[0] and band[1]:
        hi = dict(band[1])
        pairs = [(t, lo, hi[t]) for t, lo in band[0] if t in hi]
        if pairs:
            ax.fill_between([t - t0 for t, _, _ in pairs], [lo for _, lo, _ in pairs], [h for _, _, h in pairs],
                            color="tab:green", alpha=0.2, linewidth=0, label=band[2])
            drawn = True
    for (label, pts), colour in zip(lines, _SERIES_COLOURS):
        if pts:
            xs, ys = _with_gaps(pts)
            ax.plot([x - t0 for x in xs], ys, label=label, linewidth=1.4, color=colour)
            drawn = True
    if threshold is not None:
        ax.axhline(threshold, color="black", linewidth=0.8, linestyle=":", label=f"threshold {threshold}")
    for name, at in marks.items():
        ax.axvline(at - t0, color="dimgrey", linestyle=_MARK_STYLE.get(name, ":"), linewidth=1.0)
        if label_marks:
            ax.annotate(name.replace("_", " "), xy=(at - t0, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", rotation=90, va="top", fontsize=6,
                        color="dimgrey")
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlabel("seconds since the start of the load", fontsize=8)
    ax.tick_params(labelsize=7)
    if drawn:
        ax.legend(fontsize=7, loc="upper left", ncol=4, framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog: the SVG is inlined in HTML


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _fmt_t(t: float | None, t0: float) -> str:
    return "-" if t is None else f"{t - t0:+.1f} s"


def write_report(out_dir: Path, summary: Mapping[str, Any], series: Mapping[str, Points],
                 learner_rows: Sequence[Sequence[Any]], actions: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``report.html`` into ``out_dir``; returns its path."""
    t0 = summary["load_started_at"]
    steps = summary["steps"]
    marks = {k: v for k, v in {
        "predicted": (steps.get("predicted") or {}).get("at"),
        "failure": (steps.get("failure") or {}).get("at"),
        "alert_received": (steps.get("alert_received") or {}).get("at"),
        "action_started": (steps.get("action_started") or {}).get("at"),
        "verified": (steps.get("verified") or {}).get("at"),
        "sigstop": (steps.get("stall") or {}).get("sigstop_at"),
        "restarted": (steps.get("stall") or {}).get("restart_finished_at"),
        "serving_again": (steps.get("stall") or {}).get("serving_again_at"),
    }.items() if v is not None}
    figures = []
    for i, (title, ylabel, keys) in enumerate(PLOTS):
        lines = [(label, list(series.get(key, []))) for label, key in keys]
        threshold = summary.get("threshold") if title.startswith("Predicted") else None
        b = _BANDS.get(title)
        band = (list(series.get(b[0], [])), list(series.get(b[1], [])), b[2]) if b else None
        svg = _svg(title, ylabel, lines, t0, marks, summary["phases"], threshold, label_marks=i < 2, band=band)
        figures.append(f'<figure class="plot">{svg}</figure>')

    verdict = ("The loop closed" if summary["loop_closed"]
               else f"The loop did not close: {summary.get('not_closed_because')}")
    step_rows = [
        ("failure predicted", _fmt_t(marks.get("predicted"), t0),
         (steps.get("predicted") or {}).get("failure_type", "-")),
        ("failure", _fmt_t(marks.get("failure"), t0),
         "prevented" if (steps.get("failure") or {}).get("prevented") else (steps.get("failure") or {}).get("failure_type", "-")),
        ("alert at the receiver", _fmt_t(marks.get("alert_received"), t0), (steps.get("alert_received") or {}).get("alertname", "-")),
        ("mitigation started", _fmt_t(marks.get("action_started"), t0), (steps.get("action_started") or {}).get("strategy", "-")),
        ("verified", _fmt_t(marks.get("verified"), t0), (steps.get("verified") or {}).get("outcome", "-")),
        ("outcome at the learner", _fmt_t((steps.get("learner_recorded") or {}).get("at"), t0), ""),
        ("engine frozen (SIGSTOP)", _fmt_t(marks.get("sigstop"), t0), ""),
        ("stall detected", _fmt_t((steps.get("stall") or {}).get("detected_at"), t0), ""),
        ("restart finished", _fmt_t(marks.get("restarted"), t0), (steps.get("stall") or {}).get("outcome") or "-"),
        ("serving again", _fmt_t(marks.get("serving_again"), t0), ""),
    ]
    act_rows = [(a.get("id"), (a.get("alert") or {}).get("alertname"), a.get("strategy") or "-", a.get("outcome") or a.get("status"),
                 (a.get("why") or "")[:140]) for a in actions]
    lat = {k: ("-" if v is None else v) for k, v in (summary.get("latency") or {}).items()}
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vllm-otel demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1050px; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.4em; }}
.verdict {{ padding: .6em 1em; border-radius: 6px; background: {"#e3f5e3" if summary["loop_closed"] else "#fbe3e3"}; }}
table {{ border-collapse: collapse; font-size: .85em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
figure.plot {{ margin: .4em 0; }} figure.plot svg {{ width: 100%; height: auto; }}
</style></head><body>
<h1>vllm-otel demo: the loop on a real vLLM</h1>
<p class="verdict" id="verdict"><b>{html.escape(verdict)}.</b>
Prediction to alert at the receiver: {lat.get("prediction_to_alert_s", "-")} s;
alert to verified mitigation: {lat.get("alert_to_verified_s", "-")} s;
warning ahead of the failure: {lat.get("lead_s", "-")} s{" (prevented)" if (steps.get("failure") or {}).get("prevented") else ""}.</p>
<h2>Steps (seconds since the load started)</h2>
{_table(step_rows, ("step", "when", "what"))}
<h2>Signals, forecasts and actions</h2>
<p>Shaded: the scenario's phases (grey probe, green calm, orange ramp, blue stall). Grey vertical
lines: the steps above (named on the first two plots). Lines break where the server was not scraped.</p>
{"".join(figures)}
<h2>The learner</h2>
{_table(learner_rows, ("situation", "strategy", "attempts", "successes", "estimate")) if learner_rows else "<p>nothing learnt yet</p>"}
<h2>The receiver's audit trail</h2>
{_table(act_rows, ("id", "alert", "strategy", "outcome", "why"))}
<h2>Run</h2>
<pre>{html.escape(json.dumps({k: summary[k] for k in ("capacity_rps", "requests", "otlp", "phases") if k in summary}, indent=1, default=str))}</pre>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
