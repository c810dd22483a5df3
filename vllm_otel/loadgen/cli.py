"""``vllm-otel replay``: replay a request trace against an OpenAI-compatible server.

Exit status: 0 when at least one request succeeded, 1 when every request failed, 2 when the replay
could not start (bad arguments, unreadable or malformed trace, no model listed by the server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from .replay import ReplayError, ReplaySummary, RequestResult, run_replay
from .traces import DEFAULT_VOCAB_SIZE, MIN_TOKEN_ID, TraceError, load_trace

__all__ = ["add_parser", "run"]

_PROG = "vllm-otel replay"


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on argparse ``subparsers``; dispatch with ``args.func(args)``."""
    p = subparsers.add_parser(
        "replay", help="replay a real LLM request trace against an OpenAI-compatible server",
        description="Send the requests of an Azure (CSV) or Mooncake (JSONL) trace to "
                    "POST /v1/completions at their recorded arrival times, with prompts and "
                    "output lengths taken from the trace, and report latency and errors.")
    p.add_argument("--trace", required=True, metavar="FILE",
                   help="trace file: Azure LLM inference CSV or Mooncake JSONL")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--speed", type=_positive(float), default=1.0, metavar="X",
                   help="time compression: 2 replays twice as fast (default 1)")
    p.add_argument("--model", help="model name (default: first entry of GET /v1/models)")
    p.add_argument("--limit", type=_positive(int), metavar="N", help="replay at most N requests")
    p.add_argument("--start", type=_non_negative_int, default=0, metavar="N",
                   help="skip the first N requests of the trace (default 0)")
    p.add_argument("--duration", type=_positive(float), metavar="S",
                   help="only replay requests due within the first S seconds of wall time")
    p.add_argument("--max-input-tokens", type=_positive(int), metavar="N",
                   help="clip prompts to N tokens (e.g. the server's max model length)")
    p.add_argument("--max-output-tokens", type=_positive(int), metavar="N",
                   help="clip requested output to N tokens")
    p.add_argument("--concurrency", type=_positive(int), metavar="N",
                   help="at most N requests in flight; later ones wait (default: unlimited)")
    p.add_argument("--timeout", type=_positive(float), default=120.0, metavar="S",
                   help="per-request timeout in seconds (default 120)")
    p.add_argument("--prompt-mode", choices=("tokens", "text"), default="tokens",
                   help="send token-id prompts (exact lengths; vLLM) or word strings (any server)")
    p.add_argument("--vocab-size", type=_positive(int), default=DEFAULT_VOCAB_SIZE, metavar="N",
                   help=f"synthetic token ids are drawn from [{MIN_TOKEN_ID}, N) "
                        f"(default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--output", metavar="FILE.jsonl", help="write one JSON line per request here")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON on stdout (and nothing else there)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _fail(message: object) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def _raise_open_file_limit() -> None:
    """An open-loop replay of an overloaded server can hold thousands of sockets; the usual soft
    limit of 1024 would turn that into spurious connect errors, so lift it to the hard limit."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the old limit; --concurrency is the remedy then


def run(args: argparse.Namespace) -> int:
    try:
        requests = load_trace(args.trace, limit=args.limit, start=args.start)
    except (TraceError, ValueError) as exc:
        return _fail(exc)
    if args.duration is not None:
        # Offsets are trace time; S seconds of wall time cover S * speed seconds of trace.
        requests = [r for r in requests if r.offset_s < args.duration * args.speed]
    if not requests:
        return _fail(f"no requests selected from {args.trace} (check --start/--limit/--duration)")

    out: IO[str] | None = None
    if args.output:
        try:
            out = open(args.output, "w", encoding="utf-8")
        except OSError as exc:
            return _fail(f"cannot write {args.output}: {exc.strerror or exc}")

    def write(result: RequestResult) -> None:
        if out is not None:
            out.write(json.dumps(result.to_dict()) + "\n")
            out.flush()  # a run cut short still leaves every finished request on disk

    _raise_open_file_limit()
    try:
        summary = run_replay(
            requests, args.url, speed=args.speed, model=args.model,
            max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens,
            concurrency=args.concurrency, timeout_s=args.timeout, prompt_mode=args.prompt_mode,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
            progress=not args.no_progress, on_result=write, vocab_size=args.vocab_size)
    except (ReplayError, ValueError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if out is not None:
            out.close()

    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        Console().print(_table(summary, args.trace))
    return 1 if summary.ok == 0 else 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _table(s: ReplaySummary, trace: str) -> Table:
    table = Table(title=f"replay of {os.path.basename(trace)} (speed {s.speed:g}, model {s.model})",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    failed = s.requests - s.ok
    table.add_row("requests", f"{s.requests}  ([green]{s.ok} ok[/], "
                              f"[{'red' if failed else 'green'}]{failed} failed[/])")
    for kind, count in s.errors.items():
        example = s.error_examples.get(kind)
        table.add_row(f"  {kind}", f"{count}" + (f"  [dim]{example[:80]}[/]" if example else ""))
    table.add_row("duration", _seconds(s.duration_s))
    table.add_row("throughput", f"{s.throughput_rps:.2f} req/s, {s.output_tokens_per_s:.1f} tok/s")
    table.add_row("tokens (ok requests)", f"{s.input_tokens} in, {s.output_tokens} out")
    table.add_row("TTFT p50 / p99", f"{_seconds(s.ttft_p50_s)} / {_seconds(s.ttft_p99_s)}")
    table.add_row("end-to-end p50 / p99", f"{_seconds(s.e2e_p50_s)} / {_seconds(s.e2e_p99_s)}")
    table.add_row("schedule lag p99", _seconds(s.schedule_lag_p99_s))
    if s.input_clipped or s.output_clipped:
        table.add_row("clipped", f"{s.input_clipped} prompts, {s.output_clipped} outputs")
    return table
