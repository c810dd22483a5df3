"""The live terminal view of the demo (rich): phase, vLLM's state, the forecast, alerts, actions."""

from __future__ import annotations

import time
from typing import Any

from vllm_otel.demo.observe import PREDICTED_TYPES, Snapshot

__all__ = ["render"]


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(snap: Snapshot, started: float, log: list[str]) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    head = Table.grid(padding=(0, 2))
    for _ in range(6):
        head.add_column()
    head.add_row(
        f"[bold]phase[/] {snap.phase}", f"[bold]load[/] {snap.rate:.1f} req/s",
        f"[bold]lifecycle[/] {snap.lifecycle or '-'}", f"[bold]vLLM pid[/] {snap.vllm_pid or '-'}",
        f"[bold]answered[/] {snap.requests_ok} ok / {snap.requests_failed} failed",
        f"[bold]t[/] {time.time() - started:.0f} s")
    head.add_row(
        f"[bold]running[/] {_num(snap.running)}", f"[bold]waiting[/] {_num(snap.waiting)}",
        f"[bold]KV[/] {_num(None if snap.kv_usage is None else 100 * snap.kv_usage, '{:.0f} %')}",
        f"[bold]stalled[/] {'[red]yes[/]' if snap.stalled == 1 else 'no'}",
        f"[bold]OTLP[/] {snap.spans} span / {snap.metric_points} metric exports", "")

    fc = Table(title="forecast (live forecaster, via Prometheus)", expand=True)
    fc.add_column("failure type")
    fc.add_column("probability", justify="right")
    fc.add_column("time to failure", justify="right")
    for f in sorted(set(PREDICTED_TYPES) | {"engine_stall"} | set(snap.probability)):
        p = snap.probability.get(f)
        style = "bold red" if p is not None and p >= 0.7 else ""
        fc.add_row(f, Text(_num(p, "{:.2f}"), style=style), _num(snap.time_to_failure.get(f), "{:.0f} s"))

    acts = Table(title="receiver: alerts and actions", expand=True)
    acts.add_column("alert")
    acts.add_column("strategy")
    acts.add_column("status / outcome")
    for a in snap.actions[:6]:
        acts.add_row((a.get("alert") or {}).get("alertname") or "-", a.get("strategy") or "-",
                     a.get("outcome") or a.get("status") or "-")
    firing = ", ".join(snap.alerts) or "none"
    errors = "  ".join(f"{k}: {v}" for k, v in snap.errors.items())
    return Panel(Group(head, Text(f"firing in Prometheus: {firing}"), fc, acts,
                       Text("\n".join(log[-6:]), style="cyan"), Text(errors, style="yellow")),
                 title="vllm-otel demo: the loop on a real vLLM", border_style="blue")
