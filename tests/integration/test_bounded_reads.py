"""Every body read from the network is size-capped: a target that answers a scrape, a query or an
action with an endless (or gzip-bombed) body is refused past the limit instead of filling memory.

The servers here are real HTTP servers on loopback (threads) that stream bodies without end; the
clients are the production ones (actuator scrape source, forecaster scrape and Prometheus sources,
the supervisor client)."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import threading
from typing import Iterator

import httpx
import pytest

from vllm_otel.httpread import BodyTooLarge, request_capped, request_capped_sync
from vllm_otel.testing.processes import free_port

CHUNK = b"vllm:num_requests_running{model_name=\"m\"} 1\n" * 2000  # ~90 kB of a plausible exposition


class _Endless(http.server.BaseHTTPRequestHandler):
    """Streams an exposition-looking body chunk by chunk until the client hangs up (or ~512 MiB),
    or a small gzip body that inflates to 64 MiB (/bomb)."""

    sent: list[int] = []

    def _serve(self) -> None:
        if self.path.startswith("/bomb"):
            body = gzip.compress(b"0" * (64 << 20), 9)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if "api" in self.path else "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = 0
        try:
            while n < (512 << 20):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                n += len(CHUNK)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            _Endless.sent.append(n)

    do_GET = do_POST = _serve  # noqa: N815

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture(scope="module")
def endless() -> Iterator[str]:
    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Endless)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()


def test_capped_reads_stop_at_the_limit_sync_and_async(endless: str) -> None:
    with httpx.Client(timeout=10) as c:
        with pytest.raises(BodyTooLarge, match="larger than 1048576 bytes"):
            request_capped_sync(c, "GET", f"{endless}/metrics", max_bytes=1 << 20)
        with pytest.raises(BodyTooLarge):  # the limit counts inflated bytes: a gzip bomb stops too
            request_capped_sync(c, "GET", f"{endless}/bomb", max_bytes=1 << 20)
        ok = request_capped_sync(c, "GET", f"{endless}/bomb", max_bytes=65 << 20)
        assert len(ok.content) == 64 << 20 and ok.text[:3] == "000"  # decoded once, not twice

    async def go() -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            with pytest.raises(BodyTooLarge):
                await request_capped(c, "GET", f"{endless}/metrics", max_bytes=1 << 20)
    asyncio.run(go())
    assert _Endless.sent and min(_Endless.sent) < (64 << 20)  # the server was cut off early


def test_actuator_scrape_of_an_endless_metrics_page_reads_as_down(endless: str, monkeypatch) -> None:  # noqa: ANN001
    from vllm_otel.mitigate import actuators
    from vllm_otel.mitigate.records import Target
    from vllm_otel.mitigate.strategies import common as k

    monkeypatch.setattr(actuators, "METRICS_MAX_BYTES", 2 << 20)
    src = actuators.ScrapeMetricsSource()
    snap = asyncio.run(src.snapshot(Target(instance=endless.removeprefix("http://"))))
    assert snap is not None and snap.values[k.UP] == 0.0


def test_forecaster_sources_refuse_endless_answers(endless: str, monkeypatch) -> None:  # noqa: ANN001
    from vllm_otel.forecast import sources

    monkeypatch.setattr(sources, "METRICS_MAX_BYTES", 2 << 20)
    monkeypatch.setattr(sources, "QUERY_MAX_BYTES", 2 << 20)
    scrape = sources.ScrapeSource([f"{endless}/metrics"])
    with pytest.raises(sources.SourceError, match="larger than"):
        scrape._scrape(f"{endless}/metrics", "x", 0.0)
    prom = sources.PrometheusSource(f"{endless}")
    with pytest.raises(sources.SourceError, match="larger than"):
        prom._get("query", query="up")
