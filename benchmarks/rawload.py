"""A lean closed-loop load for an OpenAI-compatible server: raw HTTP/1.1 over keep-alive asyncio
connections, so that the client takes as little of the machine's CPU as it can and the server's
API process is what limits throughput (short prompts, a few output tokens, many in flight).

Used by benchmarks/plugin_cost.py; not a general load generator (vllm_otel.loadgen is that).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass


@dataclass
class LoadResult:
    ok: int
    errors: int
    seconds: float
    output_tokens: int

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def _request(host: str, port: int, body: bytes) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _one_connection(host: str, port: int, bodies: list[bytes], counter: list[int], stop_at: float,
                          out: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop_at:
            i = counter[0]
            counter[0] += 1
            writer.write(_request(host, port, bodies[i % len(bodies)]))
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            payload = await reader.readexactly(length) if length else b""
            if b" 200 " in status_line:
                out[0] += 1
                try:
                    out[2] += json.loads(payload)["usage"]["completion_tokens"]
                except (ValueError, KeyError):
                    pass
            else:
                out[1] += 1
    finally:
        writer.close()


def make_bodies(model: str, n: int = 256, prompt_tokens: tuple[int, int] = (4, 16),
                max_tokens: tuple[int, int] = (1, 4), seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [json.dumps({"model": model, "prompt": [rng.randrange(10, 200) for _ in range(rng.randint(*prompt_tokens))],
                        "max_tokens": rng.randint(*max_tokens), "ignore_eos": True}).encode() for _ in range(n)]


def run_load(url: str, bodies: list[bytes], seconds: float, concurrency: int) -> LoadResult:
    host, port = url.removeprefix("http://").split(":")

    async def main() -> LoadResult:
        counter, out = [0], [0, 0, 0]
        t0 = time.monotonic()
        stop_at = t0 + seconds
        await asyncio.gather(*(_one_connection(host, int(port), bodies, counter, stop_at, out)
                               for _ in range(concurrency)))
        return LoadResult(ok=out[0], errors=out[1], seconds=time.monotonic() - t0, output_tokens=out[2])

    return asyncio.run(main())
