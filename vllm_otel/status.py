"""``vllm-otel status``: one look at a running deployment.

Reads, never writes: vLLM's ``/monitoring/status`` (our endpoint plugin; lifecycle state, stalls,
in-flight requests) or, without it, vLLM's ``/metrics``; the forecaster's ``/metrics`` (top failure
probabilities); the receiver's ``GET /actions`` (recent actions, bearer token from a file). A part
that does not answer is reported as such; the others are still shown.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import httpx

__all__ = ["add_parser", "run", "gather", "render"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="state of a running deployment: vLLM, forecaster, receiver",
                       description="Show lifecycle state, stalls and in-flight requests of a vLLM server, "
                                   "the forecaster's top predictions and the receiver's recent actions. "
                                   "Exit 0 when every part asked about answered, 1 otherwise.")
    p.add_argument("--url", help="vLLM server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--forecaster", metavar="URL", help="forecaster base URL (its /metrics)")
    p.add_argument("--receiver", metavar="URL", help="receiver base URL (its GET /actions)")
    p.add_argument("--receiver-token-file", metavar="FILE",
                   help="an operator credential of the receiver (its --operator NAME=FILE)")
    p.add_argument("--vllm-token-file", metavar="FILE",
                   help="vLLM's API key or the vllm-otel control token, when its monitoring routes want one")
    p.add_argument("--top", type=int, default=5, help="predictions and actions to show (default %(default)s)")
    p.add_argument("--timeout", type=float, default=3.0, help="per request, seconds (default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _metrics(client: httpx.Client, url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get(url.rstrip("/") + "/metrics")
    r.raise_for_status()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _vllm(client: httpx.Client, url: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = client.get(url.rstrip("/") + "/monitoring/status", headers=headers)
    note = ("/monitoring/status wants a token (--vllm-token-file): showing /metrics"
            if r.status_code in (401, 403) else None)
    if r.status_code == 200:
        st = r.json()
        engines = {k: {"lifecycle_state": e.get("lifecycle_state"), "running": e.get("running_requests"),
                       "waiting": e.get("waiting_requests"), "kv_cache_usage": e.get("kv_cache_usage"),
                       "stalled": e.get("stalled"), "stall_events": e.get("stall_events")}
                   for k, e in (st.get("engines") or {}).items()}
        return {"source": "/monitoring/status", "instance": st.get("instance"), "model": st.get("model"),
                "uptime_s": st.get("uptime_s"), "in_flight": st.get("active_requests"), "engines": engines,
                "recent_stalls": list(st.get("recent_stalls") or [])[-5:], "note": st.get("note")}
    # Without our endpoint plugin: what vLLM's own /metrics says.
    m = _metrics(client, url)

    def total(name: str) -> float:
        return sum(v for _, v in m.get(name, []))

    stalled = [labels for labels, v in m.get("vllm_otel_engine_stalled", []) if v >= 1]
    running, waiting = total("vllm:num_requests_running"), total("vllm:num_requests_waiting")
    return {"source": "/metrics", "in_flight": int(running + waiting),
            "engines": {"all": {"lifecycle_state": None, "running": int(running), "waiting": int(waiting),
                                "stalled": bool(stalled)}}, "recent_stalls": [], "note": note}


def _forecaster(client: httpx.Client, url: str, top: int) -> dict[str, Any]:
    m = _metrics(client, url)
    ttf = {tuple(sorted(lb.items())): v for lb, v in m.get("vllm_otel_time_to_failure_seconds", [])}
    preds = [{"instance": lb.get("instance"), "engine": lb.get("engine"), "failure_type": lb.get("failure_type"),
              "probability": v, "time_to_failure_s": ttf.get(tuple(sorted(lb.items())))}
             for lb, v in m.get("vllm_otel_failure_probability", [])]
    preds.sort(key=lambda p: -p["probability"])
    up = [v for _, v in m.get("vllm_otel_forecaster_up", [])]
    return {"up": bool(up and up[0] >= 1), "predictions": preds[:top],
            "instances": int(sum(v for _, v in m.get("vllm_otel_forecaster_instances", [])))}


def _receiver(client: httpx.Client, url: str, token: str | None, top: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = client.get(url.rstrip("/") + "/actions", params={"limit": top}, headers=headers)
    if r.status_code in (401, 403):
        raise RuntimeError(f"HTTP {r.status_code}: the receiver wants a token (--receiver-token-file)")
    r.raise_for_status()
    acts = [{"id": a["id"], "alertname": a["alert"]["alertname"], "instance": a["alert"]["instance"],
             "strategy": a["strategy"], "mode": a["mode"], "status": a["status"], "outcome": a["outcome"],
             "created_at": a.get("created_at")} for a in r.json().get("actions", [])]
    return {"actions": acts}


def gather(url: str | None = None, forecaster: str | None = None, receiver: str | None = None, *,
           token: str | None = None, vllm_token: str | None = None, top: int = 5,
           timeout: float = 3.0) -> dict[str, Any]:
    """Everything the status shows, as a dict; each part asked about is either data or ``error``."""
    out: dict[str, Any] = {}
    with httpx.Client(timeout=timeout) as c:
        parts = (("vllm", url, lambda t: _vllm(c, t, vllm_token)),
                 ("forecaster", forecaster, lambda t: _forecaster(c, t, top)),
                 ("receiver", receiver, lambda t: _receiver(c, t, token, top)))
        for key, target, fn in parts:
            if not target:
                continue
            try:
                out[key] = {"url": target, **fn(target)}
            except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
                out[key] = {"url": target, "error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__}
    return out


def render(st: dict[str, Any]) -> str:
    """The readable form: one small table per part (rich, plain text when not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, record=True, file=io.StringIO(), force_terminal=False)
    for key, title in (("vllm", "vLLM"), ("forecaster", "Forecaster"), ("receiver", "Receiver")):
        part = st.get(key)
        if part is None:
            continue
        if "error" in part:
            console.print(f"[bold]{title}[/] {part['url']}: not answering: {part['error']}")
            continue
        if key == "vllm":
            console.print(f"[bold]vLLM[/] {part['url']} {part.get('model') or ''} "
                          f"({part.get('instance') or part['source']}): {part['in_flight']} requests in flight")
            t = Table("engine", "state", "running", "waiting", "KV use", "stalled")
            for k, e in part["engines"].items():
                kv = e.get("kv_cache_usage")
                t.add_row(k, str(e.get("lifecycle_state") or "-"), str(e.get("running")), str(e.get("waiting")),
                          "-" if kv is None else f"{kv:.0%}", "STALLED" if e.get("stalled") else "no")
            console.print(t)
            for s in part.get("recent_stalls") or []:
                console.print(f"  stall: {json.dumps(s, default=str)}")
        elif key == "forecaster":
            console.print(f"[bold]Forecaster[/] {part['url']}: {'up' if part['up'] else 'DATA SOURCE DOWN'}, "
                          f"{part['instances']} instances")
            t = Table("instance", "failure type", "probability", "time to failure")
            for p in part["predictions"]:
                ttf = p["time_to_failure_s"]
                t.add_row(str(p["instance"]), str(p["failure_type"]), f"{p['probability']:.2f}",
                          "-" if ttf is None else f"{ttf:.0f} s")
            console.print(t if part["predictions"] else "  no predictions yet")
        else:
            console.print(f"[bold]Receiver[/] {part['url']}: recent actions")
            t = Table("id", "alert", "instance", "strategy", "mode", "status", "outcome")
            for a in part["actions"]:
                t.add_row(str(a["id"]), str(a["alertname"]), str(a["instance"]), str(a["strategy"]),
                          str(a["mode"]), str(a["status"]), str(a["outcome"] or "-"))
            console.print(t if part["actions"] else "  no actions yet")
    return console.export_text()


def run(args: argparse.Namespace) -> int:
    if not (args.url or args.forecaster or args.receiver):
        print("vllm-otel status: give --url, --forecaster and/or --receiver", file=sys.stderr)
        return 2
    tokens: dict[str, str | None] = {}
    for flag in ("receiver_token_file", "vllm_token_file"):
        path = getattr(args, flag)
        try:
            tokens[flag] = Path(path).read_text().strip() if path else None
        except OSError as e:
            print(f"vllm-otel status: cannot read --{flag.replace('_', '-')}: {e.strerror}", file=sys.stderr)
            return 2
    st = gather(args.url, args.forecaster, args.receiver, token=tokens["receiver_token_file"],
                vllm_token=tokens["vllm_token_file"], top=args.top, timeout=args.timeout)
    print(json.dumps(st, indent=2, default=str) if args.json else render(st), end="" if not args.json else "\n")
    return 1 if any("error" in part for part in st.values()) else 0
