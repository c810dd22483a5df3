"""Where the forecaster's data comes from: Prometheus' HTTP API, or vLLM ``/metrics`` scraped directly.

Both sources answer one call, :meth:`Source.fetch`, with a :class:`Batch`: the new points since
the previous successful fetch as a :class:`~vllm_otel.forecast.promjson.RawFrame` (units,
instances, inputs on a time grid), the ``model_name`` of each instance, and the targets that failed.
A source that cannot deliver anything raises :class:`SourceError`; the service then keeps its last
predictions and marks them stale. Sources never invent data: a target that did not answer is
simply absent from the batch (a gap for the detector).

* :class:`PrometheusSource` (production): the first fetch backfills ``backfill_s`` of history with
  ``/api/v1/query_range``; each later fetch asks query_range for the grid points since the last one
  it got, so an outage is caught up (up to ``backfill_s``) rather than leaving a hole. Grid times
  are multiples of ``step_s``, so a restarted forecaster lines up with the old grid. A history
  too large for one answer (``max_bytes``; a large fleet's backfill) is shortened to what fits.
* :class:`ScrapeSource` (the embedded default): GETs each vLLM ``/metrics`` concurrently, parses the
  text exposition with ``prometheus_client``'s parser and labels every series with
  ``instance`` = host:port, as a Prometheus scrape would. One point per fetch, at fetch time.

Both go through :func:`~vllm_otel.forecast.promjson.parse_query_range`, so unit naming (one unit per
data-parallel engine), series combination and sharding are the same whichever source is used.
"""

from __future__ import annotations

import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

import httpx
import numpy as np

from vllm_otel.httpread import METRICS_MAX_BYTES, QUERY_MAX_BYTES, BodyTooLarge, request_capped_sync
from vllm_otel.forecast.promjson import InputError, RawFrame, in_shard, parse_query_range
from vllm_otel.forecast.signals import InputSeries

__all__ = ["Batch", "Source", "SourceError", "PrometheusSource", "ScrapeSource", "parse_exposition",
           "default_selector", "target_instance"]

log = logging.getLogger("vllm_otel.forecast")


class SourceError(RuntimeError):
    """The source delivered nothing this cycle (unreachable, slow, bad answer); one line why."""


class _TooLarge(SourceError):
    """A Prometheus answer went past ``max_bytes``. :meth:`PrometheusSource.fetch` shortens the
    range and asks again; anywhere else it is the source's error, with the size in its line."""


@dataclass
class Batch:
    """What one fetch delivered."""

    frame: RawFrame                       # new points only; may have no time steps at all
    model_names: dict[str, str]           # instance -> model_name label ("" when unknown)
    fetched_at: float                     # wall clock of the fetch
    errors: list[tuple[str, str]] = field(default_factory=list)  # (target, why) partial failures

    @property
    def empty(self) -> bool:
        return len(self.frame.t) == 0 or not self.frame.units


class Source(Protocol):
    """What the service needs of a data source."""

    kind: str

    def fetch(self, now: float) -> Batch: ...

    def close(self) -> None: ...


def _empty_frame(step_s: float) -> RawFrame:
    return RawFrame(np.zeros(0), float(step_s), [], [], {}, {})


def default_selector(inputs: InputSeries | None = None) -> str:
    """The series the detector reads, as one PromQL selector (``{__name__=~"a|b|..."}``)."""
    names = sorted((inputs or InputSeries()).metric_names())
    return '{__name__=~"' + "|".join(re.escape(n) for n in names) + '"}'


def _matchers(selector: str) -> str:
    """Label matchers given by the user (``job="vllm"`` or ``{job="vllm"}``), without braces."""
    s = selector.strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    return s.strip().strip(",")


def _model_names(result: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in result:
        labels = entry.get("metric") if isinstance(entry, Mapping) else None
        if isinstance(labels, Mapping) and labels.get("model_name"):
            out.setdefault(str(labels.get("instance", "unknown")), str(labels["model_name"]))
    return out


class PrometheusSource:
    """Series from a Prometheus (or anything speaking its HTTP API) with ``query_range``.

    ``selector``: extra label matchers ANDed with the names the detector reads, e.g.
    ``job="vllm"`` or ``{namespace="prod"}``. ``timeout`` bounds each HTTP request; a slow
    Prometheus fails the fetch (:class:`SourceError`) instead of stalling the cycle.
    """

    kind = "prometheus"

    def __init__(self, url: str, selector: str = "", timeout: float = 5.0, *, step_s: float = 5.0,
                 backfill_s: float = 1800.0, shard: tuple[int, int] | None = None,
                 inputs: InputSeries | None = None, headers: Mapping[str, str] | None = None,
                 client: httpx.Client | None = None, max_bytes: int = QUERY_MAX_BYTES) -> None:
        if step_s <= 0:
            raise ValueError("step_s must be positive")
        self.url = url.rstrip("/")
        self.inputs = inputs or InputSeries()
        self.step_s = float(step_s)
        # Prometheus refuses query_range answers over 11,000 points per series.
        self.backfill_s = min(max(float(backfill_s), self.step_s), 10_000 * self.step_s)
        self.timeout = float(timeout)
        self.shard = shard
        base = default_selector(self.inputs)
        extra = _matchers(selector)
        self.query = base[:-1] + ("," + extra if extra else "") + "}"
        self._client = client or httpx.Client(timeout=httpx.Timeout(self.timeout), headers=dict(headers or {}))
        self._last_end: float | None = None
        self.max_bytes = int(max_bytes)
        self._max_points: int | None = None  # grid points per query that fit in max_bytes, once learned

    def _grid_end(self, now: float) -> float:
        return math.floor(now / self.step_s) * self.step_s

    def fetch(self, now: float) -> Batch:
        end = self._grid_end(now)
        oldest = end - math.floor(self.backfill_s / self.step_s) * self.step_s
        start = oldest if self._last_end is None else max(self._last_end + self.step_s, oldest)
        if start > end:  # called again within one step: nothing new on the grid
            return Batch(_empty_frame(self.step_s), {}, now)
        if self._max_points is not None:
            start = max(start, end - (self._max_points - 1) * self.step_s)
        try:
            body = self._range(start, end)
        except _TooLarge:
            if start >= end:
                raise SourceError(f"Prometheus at {self.url}: one point of every series is over "
                                  f"{self.max_bytes} bytes; narrow --selector or use --shard") from None
            start = self._shorten(start, end)
            body = self._range(start, end)
        try:
            frame = parse_query_range(body, inputs=self.inputs, shard=self.shard)
        except InputError as e:
            raise SourceError(f"Prometheus answered something unusable: {e}") from None
        self._last_end = end
        if frame.units:
            # Answers are on the query's grid; keep the nominal step even when one point came back.
            frame.step_s = self.step_s
        return Batch(frame, _model_names(body["data"]["result"]), now)

    def _range(self, start: float, end: float) -> Any:
        return self._get("query_range", query=self.query, start=f"{start:.3f}", end=f"{end:.3f}",
                         step=f"{self.step_s:g}")

    def _shorten(self, start: float, end: float) -> float:
        """A history too large for one answer (a large fleet's backfill): from the sizes of the
        newest one and two points (labels once, then each point), the range that fits in half of
        ``max_bytes``, kept for later catch-ups. Older points are left out; the detector warms up
        on what fits."""
        try:
            one = len(json.dumps(self._range(end, end)))
            two = len(json.dumps(self._range(end - self.step_s, end)))
        except _TooLarge:
            raise SourceError(f"Prometheus at {self.url}: one point of every series is over "
                              f"{self.max_bytes} bytes; narrow --selector or use --shard") from None
        per_point = max(two - one, 1)
        self._max_points = max(1, 1 + int((0.5 * self.max_bytes - one) / per_point))
        new_start = max(start, end - (self._max_points - 1) * self.step_s)
        log.warning("vllm-otel forecaster: Prometheus answers over %d bytes; asking for %d points "
                    "(%.0f s) of history per query instead of %d", self.max_bytes, self._max_points,
                    end - new_start, int(round((end - start) / self.step_s)) + 1)
        return new_start

    def _get(self, endpoint: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{endpoint}"
        try:
            r = request_capped_sync(self._client, "GET", url, max_bytes=self.max_bytes, params=params)
        except BodyTooLarge as e:
            raise _TooLarge(f"Prometheus at {self.url}: {e}") from None
        except httpx.TimeoutException:
            raise SourceError(f"Prometheus at {self.url} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise SourceError(f"Prometheus at {self.url} unreachable: {type(e).__name__}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            raise SourceError(f"Prometheus at {self.url}: HTTP {r.status_code}, not JSON") from None
        if r.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
            why = body.get("error", "") if isinstance(body, dict) else ""
            raise SourceError(f"Prometheus at {self.url}: HTTP {r.status_code} {why}".strip())
        return body

    def close(self) -> None:
        self._client.close()


def target_instance(target: str) -> tuple[str, str]:
    """A scrape target -> (metrics URL, instance label). ``host:port`` or a URL; path defaults to /metrics."""
    t = target.strip()
    if "://" not in t:
        t = "http://" + t
    parts = urlsplit(t)
    if not parts.hostname:
        raise ValueError(f"not a scrape target: {target!r}")
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    url = f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return url, f"{parts.hostname}:{port}"


def parse_exposition(text: str, instance: str, t: float, names: set[str] | None = None) -> list[dict[str, Any]]:
    """Prometheus text exposition -> query_range-style series (one point at ``t``) labelled ``instance``.

    ``names``: keep only samples with these names (the parser still reads everything).
    Raises ``ValueError`` on text the parser rejects.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: list[dict[str, Any]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if names is not None and s.name not in names:
                continue
            labels = {**s.labels, "__name__": s.name, "instance": instance}
            out.append({"metric": labels, "values": [[t, repr(float(s.value))]]})
    return out


class ScrapeSource:
    """vLLM ``/metrics`` endpoints scraped directly: the embedded default, no Prometheus needed.

    Targets are fetched concurrently, each within ``timeout``. A target that fails is reported in
    :attr:`Batch.errors` and is absent from the batch; only when every target fails is the fetch a
    :class:`SourceError`. Targets outside ``shard`` are not even fetched.
    """

    kind = "scrape"

    def __init__(self, targets: Sequence[str], timeout: float = 5.0, *, shard: tuple[int, int] | None = None,
                 inputs: InputSeries | None = None, step_s: float = 5.0, max_workers: int = 16,
                 client: httpx.Client | None = None) -> None:
        if not targets:
            raise ValueError("ScrapeSource needs at least one target")
        self.inputs = inputs or InputSeries()
        self.timeout = float(timeout)
        self.step_s = float(step_s)
        resolved = [target_instance(t) for t in targets]
        seen: set[str] = set()
        self.targets: list[tuple[str, str]] = []
        for url, inst in resolved:
            if inst not in seen and in_shard(inst, shard):
                seen.add(inst)
                self.targets.append((url, inst))
        self.shard = shard
        self._names = self.inputs.metric_names()
        self._client = client or httpx.Client(timeout=httpx.Timeout(self.timeout))
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(self.targets) or 1)),
                                        thread_name_prefix="vllm-otel-scrape")

    def _scrape(self, url: str, instance: str, t: float) -> list[dict[str, Any]]:
        try:
            r = request_capped_sync(self._client, "GET", url, max_bytes=METRICS_MAX_BYTES)
        except BodyTooLarge as e:
            raise SourceError(str(e)) from None
        if r.status_code != 200:
            raise SourceError(f"HTTP {r.status_code}")
        return parse_exposition(r.text, instance, t, self._names)

    def fetch(self, now: float) -> Batch:
        if not self.targets:
            return Batch(_empty_frame(self.step_s), {}, now)
        futures = [(inst, self._pool.submit(self._scrape, url, inst, now)) for url, inst in self.targets]
        result: list[dict[str, Any]] = []
        errors: list[tuple[str, str]] = []
        for inst, fut in futures:
            try:
                result.extend(fut.result())
            except httpx.TimeoutException:
                errors.append((inst, f"no answer within {self.timeout:g} s"))
            except (httpx.HTTPError, SourceError) as e:
                errors.append((inst, f"{type(e).__name__}: {e}"))
            except ValueError as e:  # the text parser: not a Prometheus exposition
                errors.append((inst, f"unparseable exposition: {e}"))
        if len(errors) == len(futures):
            raise SourceError("no target answered: " + "; ".join(f"{i}: {w}" for i, w in errors[:5]))
        body = {"status": "success", "data": {"resultType": "matrix", "result": result}}
        frame = parse_query_range(body, inputs=self.inputs)
        frame.step_s = self.step_s
        return Batch(frame, _model_names(result), now, errors)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
