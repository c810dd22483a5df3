"""Plain-dict builders for Grafana dashboard JSON (schema 39, Grafana 10.4+ / 11).

Dashboards are data: these helpers only fill in what every panel must carry (the ``datasource``
variable, a unit, a description, a grid position) so that the dashboard modules read as a list of
questions and queries. No builder library: the ones on PyPI are stale or pinned to one Grafana.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["DS", "TAG", "Target", "target", "timeseries", "stat", "table", "heatmap", "state_timeline",
           "bargauge", "row", "query_variable", "dashboard", "datasource_variable"]

DS = {"type": "prometheus", "uid": "${datasource}"}
TAG = "vllm-otel"  # every dashboard carries it; the links between the four follow it
SCHEMA_VERSION = 39

Target = dict[str, Any]
Panel = dict[str, Any]


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False,
           heatmap: bool = False, ref: str | None = None) -> Target:
    t: Target = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto",
                 "range": not instant, "instant": instant}
    if table:
        t["format"] = "table"
    if heatmap:
        t["format"] = "heatmap"
    if ref:
        t["refId"] = ref
    return t


def _panel(kind: str, title: str, description: str, targets: Iterable[Target], unit: str, *,
           w: int, h: int, defaults: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
           overrides: list[dict[str, Any]] | None = None) -> Panel:
    if not description:
        raise ValueError(f"panel {title!r}: every panel needs a description")
    tgts = []
    for i, t in enumerate(targets):
        t = dict(t)
        t.setdefault("refId", chr(ord("A") + i))
        tgts.append(t)
    fd: dict[str, Any] = {"unit": unit}
    fd.update(defaults or {})
    return {"type": kind, "title": title, "description": description, "datasource": DS,
            "targets": tgts, "fieldConfig": {"defaults": fd, "overrides": overrides or []},
            "options": options or {}, "gridPos": {"w": w, "h": h}}


def _thresholds(steps: list[tuple[float | None, str]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def timeseries(title: str, description: str, targets: Iterable[Target], unit: str, *, w: int = 12,
               h: int = 8, stack: bool = False, min: float | None = None, max: float | None = None,
               threshold: float | None = None, bars: bool = False,
               overrides: list[dict[str, Any]] | None = None) -> Panel:
    custom: dict[str, Any] = {"drawStyle": "bars" if bars else "line", "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": False,
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    defaults: dict[str, Any] = {"custom": custom}
    if min is not None:
        defaults["min"] = min
    if max is not None:
        defaults["max"] = max
    if threshold is not None:  # drawn as a dashed line: the level an alert or a forecast uses
        custom["thresholdsStyle"] = {"mode": "dashed"}
        defaults["thresholds"] = _thresholds([(None, "green"), (threshold, "red")])
    return _panel("timeseries", title, description, targets, unit, w=w, h=h, defaults=defaults,
                  options={"legend": {"displayMode": "table", "placement": "bottom",
                                      "calcs": ["lastNotNull", "max"]},
                           "tooltip": {"mode": "multi", "sort": "desc"}}, overrides=overrides)


def stat(title: str, description: str, targets: Iterable[Target], unit: str, *, w: int = 4, h: int = 4,
         steps: list[tuple[float | None, str]] | None = None, decimals: int | None = None,
         mappings: list[dict[str, Any]] | None = None) -> Panel:
    defaults: dict[str, Any] = {"thresholds": _thresholds(steps or [(None, "green")]),
                                "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if mappings:
        defaults["mappings"] = mappings
    return _panel("stat", title, description, targets, unit, w=w, h=h, defaults=defaults,
                  options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "colorMode": "background", "graphMode": "area", "textMode": "auto"})


def bargauge(title: str, description: str, targets: Iterable[Target], unit: str, *, w: int = 12,
             h: int = 8, min: float = 0, max: float | None = None,
             steps: list[tuple[float | None, str]] | None = None) -> Panel:
    defaults: dict[str, Any] = {"min": min, "thresholds": _thresholds(steps or [(None, "green")]),
                                "color": {"mode": "thresholds"}}
    if max is not None:
        defaults["max"] = max
    return _panel("bargauge", title, description, targets, unit, w=w, h=h, defaults=defaults,
                  options={"orientation": "horizontal", "displayMode": "gradient",
                           "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})


def table(title: str, description: str, targets: Iterable[Target], unit: str, *, w: int = 24,
          h: int = 8, organize: dict[str, Any] | None = None) -> Panel:
    p = _panel("table", title, description, targets, unit, w=w, h=h,
               options={"showHeader": True, "cellHeight": "sm"})
    transforms: list[dict[str, Any]] = [{"id": "merge", "options": {}}]
    if organize:
        transforms.append({"id": "organize", "options": organize})
    p["transformations"] = transforms
    return p


def heatmap(title: str, description: str, targets: Iterable[Target], unit: str, *, w: int = 12,
            h: int = 8) -> Panel:
    return _panel("heatmap", title, description, targets, unit, w=w, h=h,
                  options={"calculate": False, "yAxis": {"unit": unit},
                           "cellGap": 1, "color": {"mode": "scheme", "scheme": "Spectral",
                                                   "steps": 64},
                           "tooltip": {"show": True, "yHistogram": True}})


def state_timeline(title: str, description: str, targets: Iterable[Target], *, w: int = 24, h: int = 6,
                   mappings: list[dict[str, Any]] | None = None) -> Panel:
    return _panel("state-timeline", title, description, targets, "none", w=w, h=h,
                  defaults={"mappings": mappings or [], "color": {"mode": "palette-classic"}},
                  options={"mergeValues": True, "showValue": "auto", "rowHeight": 0.8})


@dataclass
class row:  # noqa: N801 - reads like the other builders
    title: str
    panels: list[Panel] = field(default_factory=list)
    collapsed: bool = False


def datasource_variable() -> dict[str, Any]:
    """The one variable every panel uses; file provisioning does not resolve ``__inputs``."""
    return {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def query_variable(name: str, label: str, query: str, *, multi: bool = True,
                   include_all: bool = True) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "sort": 1, "multi": multi, "includeAll": include_all,
            "allValue": ".*" if include_all else None, "current": {}, "hide": 0, "options": [],
            "regex": ""}


def _layout(rows: list[row]) -> list[Panel]:
    """Grid positions left to right, wrapping at 24 columns; collapsed rows keep their panels."""
    out: list[Panel] = []
    y = 0
    next_id = 1
    for r in rows:
        header: Panel = {"type": "row", "title": r.title, "collapsed": r.collapsed, "id": next_id,
                         "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []}
        next_id += 1
        out.append(header)
        y += 1
        x = 0
        line_h = 0
        placed = []
        for p in r.panels:
            p = dict(p)
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                y += line_h
                x, line_h = 0, 0
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            p["id"] = next_id
            next_id += 1
            x += w
            line_h = max(line_h, h)
            placed.append(p)
        y += line_h
        if r.collapsed:
            header["panels"] = placed
        else:
            out.extend(placed)
    return out


def dashboard(uid: str, title: str, description: str, tags: list[str], variables: list[dict[str, Any]],
              rows: list[row], annotations: list[dict[str, Any]], *, refresh: str = "30s",
              time_from: str = "now-1h") -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": [TAG, *tags],
        "editable": True, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION, "version": 1,
        "refresh": refresh, "time": {"from": time_from, "to": "now"}, "timezone": "",
        "links": [{"title": "vllm-otel dashboards", "type": "dashboards", "tags": [TAG],
                   "asDropdown": True, "includeVars": True, "keepTime": True, "targetBlank": False,
                   "icon": "external link", "tooltip": "", "url": ""}],
        "annotations": {"list": [
            {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
             "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
             "type": "dashboard"},
            *annotations]},
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": _layout(rows),
    }


def annotation(name: str, expr: str, *, color: str, title: str, text: str) -> dict[str, Any]:
    return {"name": name, "datasource": DS, "enable": True, "hide": False, "iconColor": color,
            "expr": expr, "step": "30s", "titleFormat": title, "textFormat": text,
            "useValueForTime": False, "tagKeys": ""}
