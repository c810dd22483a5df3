"""Replay trace requests against any OpenAI-compatible server, on the trace's own schedule.

The replay is open-loop: request *i* is sent at ``offset_s / speed`` whether or not earlier ones
have finished, because that is how real users arrive and it is what exposes queueing, preemption
and overload. ``concurrency`` turns it into a capped loop for servers that must not be flooded.

Each request is a streamed ``POST /v1/completions`` with ``ignore_eos`` so the server generates
exactly the trace's output length. Failures are counted by kind and never stop the run: a server
that sheds load with 429/503 is a result to measure, not a reason to give up.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Sequence

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .traces import (DEFAULT_VOCAB_SIZE, MIN_TOKEN_ID, TraceRequest, prompt_text,
                     prompt_token_ids)

__all__ = ["replay", "run_replay", "ReplaySummary", "RequestResult", "ReplayError", "PromptMode",
           "ERROR_KINDS", "percentile", "detect_model"]

PromptMode = Literal["tokens", "text"]
ERROR_KINDS = ("http_429", "http_503", "http_4xx", "http_5xx", "timeout", "connect", "other")
_DETAIL_CHARS = 300  # enough for a server's error message, short enough for a JSONL line


class ReplayError(RuntimeError):
    """The replay could not start (e.g. the model list could not be fetched)."""


@dataclass
class RequestResult:
    """What happened to one request. Times in seconds; instants are relative to the replay start."""

    index: int
    offset_s: float  # arrival in the trace
    scheduled_s: float  # offset_s / speed: when it should have been sent
    input_tokens: int  # prompt tokens sent (after clipping)
    max_tokens: int  # output tokens requested (after clipping)
    input_clipped: bool = False
    output_clipped: bool = False
    started_s: float | None = None  # when it was actually sent (later under a concurrency cap)
    ok: bool = False
    error: str | None = None  # one of ERROR_KINDS
    detail: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplaySummary:
    """Totals and latency percentiles; token totals and latencies cover successful requests only."""

    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    throughput_rps: float  # successful requests per second of wall time
    output_tokens_per_s: float
    input_tokens: int
    output_tokens: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    input_clipped: int = 0
    output_clipped: int = 0
    # How late requests left compared with the trace: large values mean the client (or the
    # concurrency cap) could not keep the schedule, so the offered load was lower than the trace's.
    schedule_lag_p99_s: float | None = None
    model: str | None = None
    speed: float = 1.0
    error_examples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, linear interpolation), or None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(results: Sequence[RequestResult], duration_s: float, *, model: str | None = None,
              speed: float = 1.0) -> ReplaySummary:
    good = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            kind = r.error or "other"
            errors[kind] = errors.get(kind, 0) + 1
            if r.detail and kind not in examples:
                examples[kind] = r.detail
    out_tokens = sum(r.output_tokens for r in good)
    lags = [r.started_s - r.scheduled_s for r in results if r.started_s is not None]
    return ReplaySummary(
        requests=len(results),
        ok=len(good),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        throughput_rps=len(good) / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=out_tokens / duration_s if duration_s > 0 else 0.0,
        input_tokens=sum(r.input_tokens for r in good),
        output_tokens=out_tokens,
        ttft_p50_s=percentile([r.ttft_s for r in good if r.ttft_s is not None], 50),
        ttft_p99_s=percentile([r.ttft_s for r in good if r.ttft_s is not None], 99),
        e2e_p50_s=percentile([r.e2e_s for r in good if r.e2e_s is not None], 50),
        e2e_p99_s=percentile([r.e2e_s for r in good if r.e2e_s is not None], 99),
        input_clipped=sum(r.input_clipped for r in results),
        output_clipped=sum(r.output_clipped for r in results),
        schedule_lag_p99_s=percentile(lags, 99),
        model=model,
        speed=speed,
        error_examples=examples,
    )


# ----------------------------------------------------------------------------------------------
# HTTP


def api_root(base_url: str) -> str:
    """Accept ``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` alike."""
    root = base_url.strip().rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _http_kind(status: int) -> str:
    if status == 429:
        return "http_429"
    if status == 503:
        return "http_503"
    return "http_4xx" if status < 500 else "http_5xx"


def _error_detail(body: bytes | str) -> str:
    """The server's own message when the body is OpenAI-style JSON, else the raw text."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:_DETAIL_CHARS]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:_DETAIL_CHARS]
        if isinstance(err, str):
            return err[:_DETAIL_CHARS]
    return text.strip()[:_DETAIL_CHARS]


async def detect_model(client: httpx.AsyncClient) -> str:
    """The first model the server lists under ``GET /v1/models``."""
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except httpx.HTTPStatusError as exc:
        raise ReplayError(f"GET {exc.request.url} returned HTTP {exc.response.status_code}: "
                          f"{_error_detail(exc.response.content)}; pass --model") from None
    except httpx.HTTPError as exc:
        raise ReplayError(f"cannot reach {client.base_url}: {exc!r}") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ReplayError(f"{client.base_url}/v1/models did not list any model; "
                          "pass --model") from None


class _StreamFailed(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


class _Stream:
    """Accumulates TTFT and token counts from completion chunks (streamed or a single JSON body)."""

    def __init__(self, sent_at: float, loop: asyncio.AbstractEventLoop) -> None:
        self.sent_at, self.loop = sent_at, loop
        self.ttft_s: float | None = None
        self.token_chunks = 0
        self.usage_tokens: int | None = None

    def feed(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise _StreamFailed("other", f"unexpected chunk {str(obj)[:_DETAIL_CHARS]}")
        if obj.get("error"):  # vLLM reports failures after the 200 header as an in-stream error
            err = obj["error"]
            code = err.get("code") if isinstance(err, dict) else None
            kind = _http_kind(code) if isinstance(code, int) and code >= 400 else "other"
            raise _StreamFailed(kind, _error_detail(json.dumps(obj)))
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and (choice.get("text") or choice.get("token_ids")):
                if self.ttft_s is None:
                    self.ttft_s = self.loop.time() - self.sent_at
                self.token_chunks += 1
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]

    @property
    def output_tokens(self) -> int:
        # Usage is exact; counting chunks undercounts when a server batches tokens per chunk.
        return self.usage_tokens if self.usage_tokens is not None else self.token_chunks


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of a server-sent-event stream. Only CR, LF and CRLF end a line in SSE: httpx's
    ``aiter_lines`` also splits at U+2028, U+0085 and other ``str.splitlines`` breaks, which a
    model's text may hold unescaped inside a JSON chunk (seen with the tiny test model: a chunk
    cut in two, "Unterminated string")."""
    buf = ""
    async for chunk in chunks:
        buf += chunk
        # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
        cut = len(buf) - 1 if buf.endswith("\r") else len(buf)
        text, tail = buf[:cut], buf[cut:]
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        buf = lines.pop() + tail
        for line in lines:
            yield line
    if buf:
        yield buf.rstrip("\r")


async def _send(client: httpx.AsyncClient, body: dict[str, Any], result: RequestResult,
                timeout_s: float, loop: asyncio.AbstractEventLoop) -> None:
    sent_at = loop.time()
    stream = _Stream(sent_at, loop)
    try:
        # asyncio.timeout bounds the whole request; httpx's own timeout is per read/connect only.
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                result.status = resp.status_code
                if resp.status_code >= 400:
                    result.error = _http_kind(resp.status_code)
                    result.detail = _error_detail(await resp.aread())
                    return
                if resp.headers.get("content-type", "").startswith("application/json"):
                    stream.feed(json.loads(await resp.aread()))  # server ignored stream=true
                else:
                    async for line in sse_lines(resp.aiter_text()):
                        if not line.startswith("data:"):
                            continue  # SSE comments, keep-alives, event names
                        data = line[len("data:"):].strip()
                        if data == "[DONE]":
                            break
                        stream.feed(json.loads(data))
    except (TimeoutError, httpx.TimeoutException):
        result.error, result.detail = "timeout", f"no complete response within {timeout_s:g} s"
    except httpx.ConnectError as exc:
        result.error, result.detail = "connect", str(exc)[:_DETAIL_CHARS] or repr(exc)
    except _StreamFailed as exc:
        result.error, result.detail = exc.kind, exc.detail
    except (httpx.HTTPError, ValueError) as exc:  # dropped connection, malformed JSON chunk, ...
        result.error, result.detail = "other", f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS]
    else:
        if stream.ttft_s is None and stream.output_tokens == 0:
            # With ignore_eos and max_tokens >= 1 an empty answer means the server misbehaved.
            result.error, result.detail = "other", "response ended without any output"
            return
        result.ok = True
        result.e2e_s = loop.time() - sent_at
        result.output_tokens = stream.output_tokens
        # A server that sends everything at once (non-streaming) has TTFT == end-to-end latency.
        result.ttft_s = stream.ttft_s if stream.ttft_s is not None else result.e2e_s
    finally:
        if not result.ok:
            result.ttft_s = stream.ttft_s


# ----------------------------------------------------------------------------------------------
# Scheduling


def _clip(value: int, cap: int | None) -> tuple[int, bool]:
    # At least one token each way: vLLM rejects empty prompts and max_tokens=0 would not load it.
    clipped = cap is not None and value > cap
    return max(1, cap if clipped else value), clipped  # type: ignore[arg-type]


def _progress(total: int, enabled: bool) -> Progress:
    console = Console(stderr=True)  # stdout stays clean for --json
    return Progress(TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                    console=console, disable=not (enabled and console.is_terminal), transient=False)


async def replay(
    requests: Sequence[TraceRequest],
    base_url: str,
    *,
    speed: float = 1.0,
    model: str | None = None,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    concurrency: int | None = None,
    timeout_s: float = 120,
    prompt_mode: PromptMode = "tokens",
    api_key: str | None = None,
    progress: bool = True,
    on_result: Callable[[RequestResult], Any] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> ReplaySummary:
    """Send ``requests`` to ``base_url`` at ``offset_s / speed`` and summarise what came back.

    ``on_result`` is called (and awaited, if it returns an awaitable) with each finished
    :class:`RequestResult`, in completion order. Raises :class:`ReplayError` only when the replay
    cannot start, e.g. ``model`` is None and ``GET /v1/models`` fails.
    """
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if timeout_s <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout_s}")
    for name, cap in (("max_input_tokens", max_input_tokens),
                      ("max_output_tokens", max_output_tokens)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be >= 1, got {cap}")
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {MIN_TOKEN_ID}, got {vocab_size}")
    if prompt_mode not in ("tokens", "text"):
        raise ValueError(f"prompt_mode must be 'tokens' or 'text', got {prompt_mode!r}")

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Without a cap the pool must be unbounded too: httpx's default of 100 connections would
    # silently queue requests client-side and make the server look slower than it is.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=api_root(base_url), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout_s)) as client:
        if model is None:
            model = await detect_model(client)
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        results: list[RequestResult] = []
        counts = {"ok": 0, "err": 0}

        with _progress(len(requests), progress) as bar:
            task_id = bar.add_task("replay", total=len(requests), status="")
            t0 = loop.time()

            async def one(index: int, req: TraceRequest) -> None:
                n_in, in_clipped = _clip(req.input_tokens, max_input_tokens)
                n_out, out_clipped = _clip(req.output_tokens, max_output_tokens)
                result = RequestResult(index=index, offset_s=req.offset_s,
                                       scheduled_s=req.offset_s / speed, input_tokens=n_in,
                                       max_tokens=n_out, input_clipped=in_clipped,
                                       output_clipped=out_clipped, started_s=loop.time() - t0)
                make_prompt = prompt_token_ids if prompt_mode == "tokens" else prompt_text
                body = {
                    "model": model,
                    "prompt": make_prompt(req, length=n_in, salt=index, vocab_size=vocab_size),
                    "max_tokens": n_out,
                    "stream": True,
                    "ignore_eos": True,  # vLLM extension: generate exactly max_tokens
                    "stream_options": {"include_usage": True},
                }
                try:
                    await _send(client, body, result, timeout_s, loop)
                finally:
                    if gate is not None:
                        gate.release()
                results.append(result)
                counts["ok" if result.ok else "err"] += 1
                bar.update(task_id, advance=1,
                           status=f"[green]{counts['ok']} ok[/] [red]{counts['err']} failed[/]")
                if on_result is not None:
                    maybe = on_result(result)
                    if inspect.isawaitable(maybe):
                        await maybe

            # Indexes follow the caller's order (they key the prompts); sending follows the clock.
            schedule = sorted(enumerate(requests), key=lambda item: item[1].offset_s)
            async with asyncio.TaskGroup() as group:
                for index, req in schedule:
                    delay = t0 + req.offset_s / speed - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    # Waiting here rather than in the task keeps at most `concurrency` tasks alive
                    # and sends queued requests in trace order.
                    if gate is not None:
                        await gate.acquire()
                    group.create_task(one(index, req))
            duration = loop.time() - t0

    results.sort(key=lambda r: r.index)
    return summarize(results, duration, model=model, speed=speed)


def run_replay(requests: Sequence[TraceRequest], base_url: str, **kwargs: Any) -> ReplaySummary:
    """Synchronous :func:`replay` for scripts and tests that have no event loop of their own."""
    return asyncio.run(replay(requests, base_url, **kwargs))
