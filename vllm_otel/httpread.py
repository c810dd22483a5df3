"""Size-capped HTTP reads: no answer from the network is read past a limit.

A scrape of a target's ``/metrics``, a Prometheus query, a hook's or a supervisor's answer: any of
them can be huge by mistake (a label explosion) or on purpose (a compromised target, a gzip bomb),
and reading it whole would take the receiver's or the forecaster's memory. These helpers stream
the body, count the *decoded* bytes, and stop at the limit with :class:`BodyTooLarge`.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["BodyTooLarge", "request_capped", "request_capped_sync", "METRICS_MAX_BYTES",
           "ANSWER_MAX_BYTES", "QUERY_MAX_BYTES"]

# vLLM's /metrics is ~100-300 kB (mostly histogram buckets); 32 MiB leaves room for many models
# and LoRA adapters, not for a runaway exposition.
METRICS_MAX_BYTES = 32 << 20
# Prometheus query answers (instant vectors for one target, query_range for the forecaster).
QUERY_MAX_BYTES = 64 << 20
# Control, supervisor, hook and escalation answers: small JSON documents.
ANSWER_MAX_BYTES = 1 << 20

_DROP = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class BodyTooLarge(httpx.HTTPError):
    """The answer's body went past the limit; nothing of it is returned. An ``httpx.HTTPError``,
    so callers that already treat transport failures as "unreachable" treat this the same way."""

    def __init__(self, url: Any, limit: int) -> None:
        super().__init__(f"answer from {url} larger than {limit} bytes; not read")
        self.limit = limit


def _declared_too_large(r: httpx.Response, limit: int) -> bool:
    declared = r.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > limit and "content-encoding" not in r.headers


def _rebuilt(r: httpx.Response, body: bytes) -> httpx.Response:
    # Decoded already: the copy must not claim an encoding (it would be decoded twice).
    headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in _DROP]
    return httpx.Response(r.status_code, headers=headers, content=body, request=r.request)


async def request_capped(client: httpx.AsyncClient, method: str, url: str, *, max_bytes: int,
                         **kwargs: Any) -> httpx.Response:
    """``client.request(...)`` whose body is read up to ``max_bytes`` (decoded), else
    :class:`BodyTooLarge`. The returned response is fully read (``.json()``, ``.text`` work)."""
    async with client.stream(method, url, **kwargs) as r:
        if _declared_too_large(r, max_bytes):
            raise BodyTooLarge(url, max_bytes)
        chunks, size = [], 0
        async for chunk in r.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(url, max_bytes)
            chunks.append(chunk)
        return _rebuilt(r, b"".join(chunks))


def request_capped_sync(client: httpx.Client, method: str, url: str, *, max_bytes: int,
                        **kwargs: Any) -> httpx.Response:
    """The blocking twin of :func:`request_capped`."""
    with client.stream(method, url, **kwargs) as r:
        if _declared_too_large(r, max_bytes):
            raise BodyTooLarge(url, max_bytes)
        chunks, size = [], 0
        for chunk in r.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(url, max_bytes)
            chunks.append(chunk)
        return _rebuilt(r, b"".join(chunks))
