"""``replay()`` and ``vllm-otel replay`` against a stand-in OpenAI-compatible streaming server.

The real vLLM server is exercised by the lead's integration tests. The stand-in here is a small
Starlette app on a free 127.0.0.1 port, only so that error paths are deterministic and fast: the
requested ``max_tokens`` picks its behaviour (429, 503, 400, 500, an in-stream error, a response
too slow for the timeout), anything else streams that many one-token chunks plus a usage chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from vllm_otel.loadgen import cli as replay_cli
from vllm_otel.loadgen.replay import ReplayError, percentile, run_replay, summarize
from vllm_otel.loadgen.traces import MIN_TOKEN_ID, TraceRequest

pytestmark = pytest.mark.timeout(60)

MODEL = "stand-in-model"
SLOW = 999  # max_tokens that makes the stand-in stall after its first token
STREAM_ERROR = 777  # max_tokens that makes it fail after the 200 header, like vLLM can
NOT_STREAMED = 555  # answers with one JSON body, as servers that ignore stream=true do
EMPTY = 556  # a 200 stream with no tokens at all
ODD_TEXT = 557  # text with U+2028 / U+0085 unescaped inside the JSON, CRLF line ends, odd chunking


class StandIn:
    """Records what arrived (time, body, auth header) and how many requests overlapped."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict[str, Any], str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.chunk_delay_s = 0.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.arrivals.append((time.monotonic(), body, request.headers.get("authorization")))
        n = body["max_tokens"]
        if n in (429, 503, 400, 500):
            return JSONResponse({"error": {"message": f"injected {n}", "code": n}}, status_code=n)
        if n == NOT_STREAMED:
            return JSONResponse({"choices": [{"index": 0, "text": "abc"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": n}})
        if n == EMPTY:
            return StreamingResponse(iter(["data: [DONE]\n\n"]), media_type="text/event-stream")
        if n == ODD_TEXT:
            # What vLLM sends when a model writes such characters: JSON leaves them unescaped.
            chunk = json.dumps({"choices": [{"index": 0, "text": "a\u2028b\x85c\u2029", "finish_reason": None}]},
                               ensure_ascii=False)
            usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
            body = f"data: {chunk}\r\n\r\ndata: {chunk}\r\n\r\ndata: {usage}\r\n\r\ndata: [DONE]\r\n\r\n"
            cuts = [0, 9, 20, body.index("\n") , body.index("\n") + 1, 70, len(body)]
            parts = [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
            return StreamingResponse(iter(parts), media_type="text/event-stream")
        return StreamingResponse(self._stream(n), media_type="text/event-stream")

    async def _stream(self, n: int) -> AsyncIterator[str]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield 'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n'
            if n == STREAM_ERROR:
                yield 'data: {"error": {"message": "engine died", "code": 500}}\n\n'
                return
            if n == SLOW:
                await asyncio.sleep(30)  # cancelled when the client gives up
            for _ in range(n - 1):
                await asyncio.sleep(self.chunk_delay_s)
                yield 'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n'
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            yield f'data: {json.dumps({"choices": [], "usage": usage})}\n\n'
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, StandIn]]:
    state = StandIn()
    app = Starlette(routes=[Route("/v1/models", state.models),
                            Route("/v1/completions", state.completions, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.started, "stand-in server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture()
def stand_in(server: tuple[str, StandIn]) -> tuple[str, StandIn]:
    server[1].reset()
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trace(*outputs: int, gap_s: float = 0.01, input_tokens: int = 20) -> list[TraceRequest]:
    return [TraceRequest(i * gap_s, input_tokens, out) for i, out in enumerate(outputs)]


# ---------------------------------------------------------------------------------------------
# replay()


def test_errors_are_counted_by_kind_and_do_not_stop_the_run(stand_in: tuple[str, StandIn]) -> None:
    url, state = stand_in
    reqs = _trace(5, 429, 5, 503, 400, 500, STREAM_ERROR, 5)
    seen: list[int] = []
    summary = run_replay(reqs, url, progress=False, on_result=lambda r: seen.append(r.index))
    assert summary.requests == 8 and summary.ok == 3
    assert summary.errors == {"http_429": 1, "http_503": 1, "http_4xx": 1, "http_5xx": 2}
    assert summary.error_examples["http_429"] == "injected 429"
    assert len(state.arrivals) == 8  # everything after the 429 was still sent
    assert sorted(seen) == list(range(8))
    assert summary.output_tokens == 15 and summary.input_tokens == 60
    assert summary.ttft_p50_s is not None and summary.e2e_p99_s is not None
    assert summary.ttft_p50_s <= summary.e2e_p50_s
    assert summary.model == MODEL


def test_request_body_is_a_streamed_token_id_completion(stand_in: tuple[str, StandIn]) -> None:
    url, state = stand_in
    run_replay([TraceRequest(0, 700, 4, (0, 1))], url + "/v1/", progress=False, api_key="sk-test",
               vocab_size=64)
    (_, body, auth), = state.arrivals
    assert body["model"] == MODEL  # auto-detected from GET /v1/models
    assert len(body["prompt"]) == 700
    assert all(isinstance(i, int) and MIN_TOKEN_ID <= i < 64 for i in body["prompt"])
    assert body["max_tokens"] == 4 and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert auth == "Bearer sk-test"


def test_text_prompt_mode_sends_a_string(stand_in: tuple[str, StandIn]) -> None:
    url, state = stand_in
    run_replay(_trace(2), url, progress=False, prompt_mode="text", model="given")
    (_, body, _), = state.arrivals
    assert isinstance(body["prompt"], str) and len(body["prompt"].split()) == 20
    assert body["model"] == "given"


def test_clipping_is_applied_and_reported(stand_in: tuple[str, StandIn]) -> None:
    url, state = stand_in
    reqs = [TraceRequest(0, 5000, 40), TraceRequest(0.01, 10, 2)]
    summary = run_replay(reqs, url, progress=False, max_input_tokens=64, max_output_tokens=8)
    sizes = sorted((len(b["prompt"]), b["max_tokens"]) for _, b, _ in state.arrivals)
    assert sizes == [(10, 2), (64, 8)]
    assert (summary.input_clipped, summary.output_clipped) == (1, 1)
    assert summary.output_tokens == 10


def test_speed_compresses_the_schedule(stand_in: tuple[str, StandIn]) -> None:
    url, state = stand_in
    reqs = [TraceRequest(t, 8, 1) for t in (0.0, 0.5, 1.0)]  # a 1 s trace ...
    results = []
    summary = run_replay(reqs, url, progress=False, speed=10, on_result=results.append)
    # ... replayed in ~0.1 s: each request leaves at offset / 10, not earlier, not all at once.
    for r in results:
        assert r.scheduled_s == pytest.approx(r.offset_s / 10)
        assert r.scheduled_s - 0.005 <= r.started_s < r.scheduled_s + 0.3
    times = [t for t, _, _ in state.arrivals]
    assert 0.06 <= times[-1] - times[0] < 0.5  # server-side view, with jitter to spare
    assert summary.ok == 3 and summary.duration_s < 0.8


def test_unsorted_requests_are_sent_in_time_order(stand_in: tuple[str, StandIn]) -> None:
    url, state = stand_in
    run_replay([TraceRequest(0.05, 8, 2), TraceRequest(0.0, 8, 3)], url, progress=False)
    assert [body["max_tokens"] for _, body, _ in state.arrivals] == [3, 2]


def test_requests_overlap_without_a_cap_and_not_with_concurrency_1(
        stand_in: tuple[str, StandIn]) -> None:
    url, state = stand_in
    state.chunk_delay_s = 0.02  # each request streams for ~0.1 s
    run_replay(_trace(6, 6, 6, gap_s=0), url, progress=False)
    assert state.max_in_flight == 3  # open loop: all three are sent at t=0
    state.max_in_flight = 0
    summary = run_replay(_trace(6, 6, 6, gap_s=0), url, progress=False, concurrency=1)
    assert state.max_in_flight == 1 and summary.ok == 3
    assert summary.schedule_lag_p99_s is not None and summary.schedule_lag_p99_s > 0.1


def test_slow_response_times_out_without_holding_up_others(stand_in: tuple[str, StandIn]) -> None:
    url, _ = stand_in
    started = time.monotonic()
    summary = run_replay(_trace(SLOW, 3), url, progress=False, timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert summary.ok == 1 and summary.errors == {"timeout": 1}


def test_unstreamed_answers_count_and_empty_answers_fail(stand_in: tuple[str, StandIn]) -> None:
    url, _ = stand_in
    summary = run_replay(_trace(NOT_STREAMED, EMPTY), url, progress=False)
    assert summary.ok == 1 and summary.output_tokens == NOT_STREAMED
    assert summary.errors == {"other": 1}
    assert summary.ttft_p50_s == pytest.approx(summary.e2e_p50_s, abs=0.05)  # all at once


def test_unreachable_server_counts_connect_errors() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    summary = run_replay(_trace(1, 1), url, progress=False, model="m", timeout_s=2)
    assert summary.ok == 0 and summary.errors == {"connect": 2}
    assert summary.ttft_p50_s is None and summary.e2e_p99_s is None
    with pytest.raises(ReplayError, match="cannot reach"):
        run_replay(_trace(1), url, progress=False)  # no model given: detection needs the server


def test_bad_arguments_are_rejected_before_sending() -> None:
    with pytest.raises(ValueError, match="speed"):
        run_replay(_trace(1), "http://127.0.0.1:1", speed=0, model="m", progress=False)


# ---------------------------------------------------------------------------------------------
# Percentiles and summaries


def test_percentiles_interpolate_linearly() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([2.0], 99) == 2.0
    assert percentile([], 50) is None


def test_summary_of_nothing_successful_has_no_latencies() -> None:
    s = summarize([], 0.0)
    assert (s.requests, s.ok, s.errors, s.throughput_rps, s.ttft_p50_s) == (0, 0, {}, 0.0, None)
    assert set(s.to_dict()) >= {"requests", "ok", "errors", "duration_s", "throughput_rps",
                                "output_tokens_per_s", "input_tokens", "output_tokens",
                                "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s"}


# ---------------------------------------------------------------------------------------------
# The CLI


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vllm-otel")
    replay_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", *argv])
    return args.func(args)


def _mooncake(tmp_path: Path, *outputs: int) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 10 * i, "input_length": 16, "output_length": o,
                                        "hash_ids": [0]}) + "\n" for i, o in enumerate(outputs)))
    return path


def test_cli_json_summary_and_jsonl_output(stand_in: tuple[str, StandIn], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = stand_in
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-from-env")
    out = tmp_path / "results.jsonl"
    rc = _cli("--trace", str(_mooncake(tmp_path, 3, 429, 3)), "--url", url, "--json",
              "--output", str(out), "--speed", "2")
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is exactly one JSON document
    assert rc == 0
    assert (summary["requests"], summary["ok"], summary["errors"]) == (3, 2, {"http_429": 1})
    assert summary["speed"] == 2 and summary["output_tokens"] == 6
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == [0, 1, 2]
    assert {r["error"] for r in lines} == {None, "http_429"}
    assert all(auth == "Bearer sk-secret-from-env" for _, _, auth in state.arrivals)
    assert "sk-secret" not in captured.out + captured.err + out.read_text()


def test_cli_prints_a_table_and_limits_by_duration(stand_in: tuple[str, StandIn], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url, state = stand_in
    # Offsets 0, 10, 20, 30 ms; --duration 0.01 at speed 2 keeps trace time < 20 ms: two requests.
    rc = _cli("--trace", str(_mooncake(tmp_path, 2, 2, 2, 2)), "--url", url, "--duration", "0.01",
              "--speed", "2", "--no-progress")
    assert rc == 0 and len(state.arrivals) == 2
    assert "TTFT" in capsys.readouterr().out


def test_cli_exit_1_when_every_request_fails(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = _cli("--trace", str(_mooncake(tmp_path, 1, 1)), "--url", f"http://127.0.0.1:{_free_port()}",
              "--model", "m", "--json", "--no-progress")
    assert rc == 1
    assert json.loads(capsys.readouterr().out)["errors"] == {"connect": 2}


def test_cli_exit_2_with_one_line_error_for_a_bad_trace(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,ten,1\n")
    rc = _cli("--trace", str(bad), "--url", "http://127.0.0.1:1", "--json")
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "bad.csv:2" in captured.err

    rc = _cli("--trace", str(_mooncake(tmp_path, 1)), "--url", "http://127.0.0.1:1", "--start", "5")
    assert rc == 2 and "no requests selected" in capsys.readouterr().err


def test_model_text_with_unicode_line_separators_is_not_split(stand_in: tuple[str, StandIn]) -> None:
    """SSE ends lines only at CR, LF, CRLF; U+2028 or U+0085 inside a chunk's JSON is text (a CI
    run lost a request to "Unterminated string" when a line parser split there)."""
    url, _ = stand_in
    summary = run_replay(_trace(ODD_TEXT), url, progress=False)
    assert summary.ok == 1, summary.error_examples
    assert summary.output_tokens == 2


def test_sse_lines_handles_crlf_split_across_chunks() -> None:
    from vllm_otel.loadgen.replay import sse_lines

    async def chunks(*parts: str) -> Any:
        for p in parts:
            yield p

    async def collect(*parts: str) -> list[str]:
        return [line async for line in sse_lines(chunks(*parts))]

    assert asyncio.run(collect("data: a\r", "\ndata: b\u2028c\n\n", "data: d")) == [
        "data: a", "data: b\u2028c", "", "data: d"]
    assert asyncio.run(collect("x\ry\r\n")) == ["x", "y"]
