"""Prometheus ``query_range`` responses (``resultType: matrix``) -> per-instance input arrays.

What ``/api/v1/query_range?query={__name__=~"vllm:.+"}`` returns: one entry per series with its
labels (``__name__``, ``instance``, ``model_name``, ``engine``, ``le`` for histogram buckets) and
``[unix_time, "value"]`` pairs. We map each series to an input (see
:class:`~vllm_otel.forecast.signals.InputSeries`), put it on a common time grid (NaN where it has
no sample: gaps, or an instance not yet started / already gone) and combine the series of each unit.

A *unit* is what the detector follows: the ``instance`` label, or ``instance/engine=N`` when one
server runs several engines (data parallel): each engine has its own KV cache, queue and token
counter, so each can stall or fill up on its own. Series without an ``engine`` label (GPU,
process) are shared by all units of their instance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from vllm_otel.forecast.signals import INPUT_KINDS, HistogramInput, InputSeries, aggregate

__all__ = ["RawFrame", "InputError", "load_query_range", "parse_query_range", "shard_index",
           "parse_shard", "in_shard"]


class InputError(ValueError):
    """The input is not a usable query_range matrix; the message says why, in one line."""


@dataclass
class RawFrame:
    """Inputs of many units on one time grid."""

    t: np.ndarray                                   # (T,) unix seconds, ascending
    step_s: float
    units: list[str]
    instances: list[str]                            # the instance label of each unit
    values: dict[str, np.ndarray]                   # input -> (U, T)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]]  # input -> (les (B,), counts (U, T, B))

    def at(self, k: int, units: np.ndarray | None = None) -> tuple[dict[str, np.ndarray],
                                                                   dict[str, HistogramInput]]:
        """Inputs at time index ``k`` for the given unit indices (all by default)."""
        sel = slice(None) if units is None else units
        values = {name: arr[sel, k] for name, arr in self.values.items()}
        hists = {name: HistogramInput(les, counts[sel, k, :]) for name, (les, counts) in self.histograms.items()}
        return values, hists

    def present(self) -> np.ndarray:
        """(U, T): the unit had any sample at that time."""
        out = np.zeros((len(self.units), len(self.t)), dtype=bool)
        for arr in self.values.values():
            out |= np.isfinite(arr)
        for _, counts in self.histograms.values():
            out |= np.isfinite(counts).any(axis=2)
        return out


def shard_index(instance: str, n: int) -> int:
    """Stable shard of an instance (0-based): the same on every host and Python run."""
    digest = hashlib.blake2b(instance.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (K from 1 to N) -> (K, N)."""
    try:
        k_s, n_s = text.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise InputError(f"--shard must look like K/N (e.g. 1/4), got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {text}: need 1 <= K <= N")
    return k, n


def in_shard(instance: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or shard_index(instance, shard[1]) == shard[0] - 1


def load_query_range(source: str | Path | IO[str], **kwargs: Any) -> RawFrame:
    """Read a query_range JSON file (``-`` for stdin) and parse it; see :func:`parse_query_range`."""
    try:
        if hasattr(source, "read"):
            obj = json.load(source)  # type: ignore[arg-type]
        elif str(source) == "-":
            import sys
            obj = json.load(sys.stdin)
        else:
            with open(source, encoding="utf-8") as fh:
                obj = json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{source}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return parse_query_range(obj, **kwargs)


def _series_list(obj: Any) -> list[Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise InputError("expected a JSON object (a Prometheus query_range response)")
    if obj.get("status", "success") != "success":
        raise InputError(f"the response has status {obj.get('status')!r}: {obj.get('error', '')}".strip())
    data = obj.get("data")
    if not isinstance(data, Mapping):
        raise InputError("no 'data' object: not a Prometheus query_range response")
    if data.get("resultType") != "matrix":
        raise InputError(f"resultType is {data.get('resultType')!r}; a query_range matrix is needed")
    result = data.get("result")
    if not isinstance(result, list):
        raise InputError("'data.result' is not a list")
    return result


def _points(entry: Mapping[str, Any], i: int) -> tuple[np.ndarray, np.ndarray]:
    values = entry.get("values")
    if not isinstance(values, list):
        raise InputError(f"series {i} has no 'values' list")
    if not values:
        return np.zeros(0), np.zeros(0)
    try:
        # Columns first, then one conversion each: numpy parses the value strings in bulk.
        t_col, v_col = zip(*values)
        ts = np.array(t_col, dtype=float)
        vs = np.array(v_col, dtype=float)
        if ts.ndim != 1 or vs.ndim != 1 or len(ts) != len(values):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"series {i}: values must be [time, \"number\"] pairs") from None
    vs[~np.isfinite(vs)] = np.nan  # +Inf/-Inf samples carry no usable level
    return ts, vs


class _Matcher:
    """:meth:`InputSeries.match` with the answer kept per metric name where labels cannot change
    it (no selector of that name looks at labels), and the shard of each instance kept."""

    def __init__(self, inputs: InputSeries, shard: tuple[int, int] | None):
        self.inputs = inputs
        self.shard = shard
        self._by_name: dict[str, str | None] = {}
        self._labelled = {sel.metric for name in INPUT_KINDS for sel in getattr(inputs, name) if sel.labels}
        self._in_shard: dict[str, bool] = {}

    def input(self, name: str, labels: Mapping[str, str]) -> str | None:
        if name in self._labelled:
            return self.inputs.match(name, labels)
        if name not in self._by_name:
            self._by_name[name] = self.inputs.match(name, labels)
        return self._by_name[name]

    def keeps(self, instance: str) -> bool:
        keep = self._in_shard.get(instance)
        if keep is None:
            keep = self._in_shard[instance] = in_shard(instance, self.shard)
        return keep


def parse_query_range(obj: Any, inputs: InputSeries | None = None, step: float | None = None,
                      shard: tuple[int, int] | None = None) -> RawFrame:
    """Parse a query_range response into a :class:`RawFrame`.

    ``step``: resample onto a regular grid of that many seconds (each point takes the last
    sample within one step before it); default: the response's own timestamps. ``shard=(K, N)``
    keeps only instances whose :func:`shard_index` is K-1.
    """
    match = _Matcher(inputs or InputSeries(), shard)
    records: list[tuple[str, str | None, str, float | None, np.ndarray, np.ndarray]] = []
    for i, entry in enumerate(_series_list(obj)):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("metric"), Mapping):
            raise InputError(f"series {i} has no 'metric' labels")
        labels = {str(k): str(v) for k, v in entry["metric"].items()}
        inp = match.input(labels.get("__name__", ""), labels)
        if inp is None:
            continue
        instance = labels.get("instance", "unknown")
        if not match.keeps(instance):
            continue
        le: float | None = None
        if INPUT_KINDS[inp][0] == "histogram":
            try:
                le = float(labels["le"])
            except (KeyError, ValueError):
                continue  # a _bucket series without a usable bound cannot be placed
        ts, vs = _points(entry, i)
        if len(ts):
            records.append((instance, labels.get("engine"), inp, le, ts, vs))

    if not records:
        return RawFrame(np.zeros(0), float(step or 0.0), [], [], {}, {})
    grid, step_s = _grid([r[4] for r in records], step)

    engines: dict[str, set[str]] = {}
    for instance, engine, *_ in records:
        engines.setdefault(instance, set())
        if engine is not None:
            engines[instance].add(engine)
    units: list[str] = []
    unit_instance: list[str] = []
    units_of: dict[str, dict[str | None, int]] = {}
    for instance in sorted(engines):
        es = sorted(engines[instance])
        keys: list[str | None] = es if len(es) > 1 else [None]
        units_of[instance] = {}
        for e in keys:
            units_of[instance][e] = len(units)
            units.append(instance if e is None else f"{instance}/engine={e}")
            unit_instance.append(instance)

    T = len(grid)
    groups: dict[tuple[str, int, float | None], list[np.ndarray]] = {}
    for instance, engine, inp, le, ts, vs in records:
        row = _on_grid(grid, ts, vs, step_s if step else None)
        per = units_of[instance]
        targets = ([per[engine]] if engine in per else
                   [per[None]] if None in per else list(per.values()))  # no engine label: shared
        for u in targets:
            groups.setdefault((inp, u, le), []).append(row)

    U = len(units)
    values: dict[str, np.ndarray] = {}
    bucket_rows: dict[str, dict[float, dict[int, np.ndarray]]] = {}
    for (inp, u, le), rows in groups.items():
        kind, agg = INPUT_KINDS[inp]
        combined = aggregate(agg, np.stack(rows)) if len(rows) > 1 else rows[0]
        if kind == "histogram":
            bucket_rows.setdefault(inp, {}).setdefault(float(le), {})[u] = combined  # type: ignore[arg-type]
        else:
            values.setdefault(inp, np.full((U, T), np.nan))[u] = combined
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for inp, by_le in bucket_rows.items():
        les = np.array(sorted(by_le))
        counts = np.full((U, T, len(les)), np.nan)
        for b, le in enumerate(les):
            for u, row in by_le[le].items():
                counts[u, :, b] = row
        histograms[inp] = (les, counts)
    return RawFrame(grid, step_s, units, unit_instance, values, histograms)


def _grid(times: list[np.ndarray], step: float | None) -> tuple[np.ndarray, float]:
    lo = min(float(t.min()) for t in times)
    hi = max(float(t.max()) for t in times)
    if step is not None:
        if step <= 0:
            raise InputError("--step must be positive")
        n = int(np.floor((hi - lo) / step + 1e-9)) + 1
        return lo + step * np.arange(n), float(step)
    # query_range answers on a common grid already: the union of timestamps is that grid.
    grid = np.unique(np.round(np.concatenate(times), 3))
    diffs = np.diff(grid)
    step_s = float(np.median(diffs)) if len(diffs) else 1.0
    return grid, step_s


def _on_grid(grid: np.ndarray, ts: np.ndarray, vs: np.ndarray, lookback: float | None) -> np.ndarray:
    order = np.argsort(ts, kind="stable")
    ts, vs = np.round(ts[order], 3), vs[order]
    if lookback is None and len(ts) == len(grid) and np.array_equal(ts, grid):
        return vs  # a sample at every grid point, as query_range answers a series without gaps
    out = np.full(len(grid), np.nan)
    if lookback is None:
        idx = np.searchsorted(grid, ts)
        ok = (idx < len(grid)) & (grid[np.minimum(idx, len(grid) - 1)] == ts)
        out[idx[ok]] = vs[ok]
        return out
    idx = np.searchsorted(ts, grid + 1e-9, side="right") - 1
    ok = (idx >= 0) & (grid - ts[np.maximum(idx, 0)] < lookback)
    out[ok] = vs[idx[ok]]
    return out
