"""Every PromQL query a dashboard holds, made checkable: extracted with where it came from, Grafana's
variables substituted, metric names listed, and the names checked against the installed vLLM and
vllm-otel's own sources.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Query", "queries", "substitute", "metric_names", "known_metric_names", "unknown_names", "vllm_installed",
           "OPTIONAL", "OPTIONAL_PANELS"]

# Series that legitimately have no data on a CPU test machine; a query using one of them is listed
# as optional in the "returns data" check, with this reason.
OPTIONAL: dict[str, str] = {
    "vllm_otel_gpu_": "GPU only (NVML)",
    "vllm:spec_decode_": "speculative decoding only",
    "vllm_otel_time_to_failure_seconds": "only while a failure is predicted within the horizon",
    "vllm_otel_learner_": "only after the learner chose a strategy or took in an outcome",
    "vllm_otel_mitigation_action_duration_seconds": "only after an action really executed",
    "ALERTS": "only while an alert fires",
}
# Panels whose query needs an event the test machine does not produce, whatever the metric.
OPTIONAL_PANELS: dict[tuple[str, str], str] = {
    ("vllm-otel-mitigation", "Success rate"): "only after an action really executed",
}
# The GPU collector's own up gauge exists everywhere, with or without a GPU.
_ALWAYS = ("vllm_otel_gpu_collector_up",)

_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<sel>.+),\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    dashboard: str   # uid
    where: str       # panel title, "variable NAME" or "annotation NAME"
    expr: str        # as stored in the dashboard (Grafana variables unsubstituted)
    kind: str        # "panel", "variable" or "annotation"

    def promql(self, **values: str) -> str:
        """The query Prometheus runs; for a label_values() variable, its series selector."""
        expr = substitute(self.expr, **values)
        if self.kind == "variable":
            m = _LABEL_VALUES.match(expr)
            if not m:
                raise ValueError(f"{self.dashboard} {self.where}: not label_values(...): {self.expr!r}")
            return m.group("sel") or "up"
        return expr

    @property
    def optional(self) -> str | None:
        if (self.dashboard, self.where) in OPTIONAL_PANELS:
            return OPTIONAL_PANELS[(self.dashboard, self.where)]
        names = metric_names(self.promql())
        for n in sorted(names):
            if n in _ALWAYS:
                continue
            for prefix, why in OPTIONAL.items():
                if n.startswith(prefix):
                    return why
        return None


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def queries(dash: dict[str, Any]) -> list[Query]:
    uid = dash["uid"]
    out = []
    for p in _panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append(Query(uid, p["title"], t["expr"], "panel"))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append(Query(uid, f"variable {v['name']}", q, "variable"))
    for a in dash["annotations"]["list"]:
        if a.get("expr"):
            out.append(Query(uid, f"annotation {a['name']}", a["expr"], "annotation"))
    return out


def substitute(expr: str, *, rate_interval: str = "1m", interval: str = "15s", range_: str = "1h",
               **values: str) -> str:
    """Grafana's built-in variables by durations, dashboard variables by ``values`` (default
    ``.*``, what "All" sends), the way Grafana interpolates before Prometheus sees the query."""
    expr = (expr.replace("$__rate_interval", rate_interval).replace("$__interval", interval)
            .replace("$__range", range_))
    defaults = {"horizon": "2m"}

    def var(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, defaults.get(name, ".*"))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, expr)


def metric_names(promql: str) -> set[str]:
    """Metric names a query reads (parsed with promql-parser, not guessed from the text)."""
    import promql_parser

    names: set[str] = set()

    def walk(node: Any) -> None:
        if node is None:
            return
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)
            return
        if isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
            return
        for attr in ("expr", "lhs", "rhs", "param", "args"):
            child = getattr(node, attr, None)
            if isinstance(child, list):
                for c in child:
                    walk(c)
            else:
                walk(child)

    walk(promql_parser.parse(promql))
    return names


_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


@lru_cache(maxsize=1)
def known_metric_names() -> frozenset[str]:
    """Metric names defined in the installed vLLM's source and in vllm-otel's own collectors.

    vLLM and prometheus_client name counters without ``_total`` and histograms without their
    suffixes, so names are compared with those suffixes stripped.
    """
    names: set[str] = {"ALERTS", "ALERTS_FOR_STATE", "up"}
    spec = _vllm_spec()
    if spec and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            for f in Path(root).rglob("*.py"):
                names.update(re.findall(r"[\"'](vllm:[a-z0-9_]+)[\"']", f.read_text(errors="replace")))
    names.update(_own_metric_names())
    return frozenset(names)


def _vllm_spec() -> Any:
    try:
        return importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None


def vllm_installed() -> bool:
    return _vllm_spec() is not None


def _own_metric_names() -> set[str]:
    """From the collectors' describe() (composed names: GPU, host, processes) and string literals."""
    import vllm_otel
    from vllm_otel.instrument.gpu import GpuCollector
    from vllm_otel.instrument.host import ProcessCollector

    names: set[str] = set()
    for c in (GpuCollector("x"), ProcessCollector("x")):  # describe() touches neither NVML nor /proc
        names.update(m.name for m in c.describe())
    pkg = Path(vllm_otel.__file__).parent
    for f in pkg.rglob("*.py"):
        if f.relative_to(pkg).parts[0] == "dashboards":
            continue  # the dashboards must not vouch for themselves
        names.update(re.findall(r"[\"'](vllm_otel_[a-z0-9_]+[a-z0-9])[\"']", f.read_text()))
    return names


def _base(name: str) -> str:
    for s in _SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def unknown_names(names: set[str]) -> set[str]:
    """Names neither the installed vLLM nor vllm-otel defines (vLLM's are not judged without vLLM)."""
    known = known_metric_names()
    known_bases = {_base(k) for k in known}
    out = set()
    check_vllm = vllm_installed()
    for n in names:
        if n.startswith("vllm:") and not check_vllm:
            continue
        if n in known or _base(n) in known_bases or _base(_base(n)) in known_bases:
            continue
        out.add(n)
    return out
