"""Build the dashboards (and what is generated from them and from ``alerts/``) and check the
committed copies: ``vllm-otel dashboards build [--check]``; ``vllm-otel dashboards push``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from vllm_otel.dashboards import forecast, gpu, mitigation, serving

__all__ = ["DASHBOARDS", "build_all", "render", "add_parser", "generated_files", "repo_root"]

# file name under dashboards/ -> builder
DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "vllm-serving.json": serving.build,
    "vllm-forecast.json": forecast.build,
    "vllm-mitigation.json": mitigation.build,
    "vllm-gpu.json": gpu.build,
}


def build_all() -> dict[str, dict[str, Any]]:
    return {name: fn() for name, fn in DASHBOARDS.items()}


def render(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def generated_files(root: Path) -> dict[Path, str]:
    """Every generated file and its content: dashboards/*.json and the Kubernetes manifests made
    from them and from alerts/*.rules.yml."""
    from vllm_otel.dashboards.alertpack import rule_files
    from vllm_otel.dashboards.kube import kubernetes_manifests

    dashes = build_all()
    out = {root / "dashboards" / name: render(d) for name, d in dashes.items()}
    rules = rule_files(root)
    out.update({root / rel: text for rel, text in rules.items()})
    # The PrometheusRule holds every rules file: the hand-written ones as they are on disk, the
    # generated ones as generated now.
    out.update({root / rel: text for rel, text in kubernetes_manifests(root, dashes, rules).items()})
    return out


def _problems(dashes: dict[str, dict[str, Any]]) -> list[str]:
    from vllm_otel.dashboards.queries import metric_names, queries, unknown_names, vllm_installed

    if not vllm_installed():
        print("vLLM is not installed here: vLLM's metric names are not checked", file=sys.stderr)
    errs = []
    for name, d in dashes.items():
        for q in queries(d):
            try:
                names = metric_names(q.promql())
            except Exception as e:  # noqa: BLE001 - report every bad query, not the first
                errs.append(f"{name}: {q.where}: does not parse: {e}")
                continue
            unknown = unknown_names(names)
            if unknown:
                errs.append(f"{name}: {q.where}: unknown metric(s) {sorted(unknown)}")
    return errs


def cmd_build(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else repo_root()
    if not (root / "alerts" / "config.yml").is_file():
        print(f"{root} is not a vllm-otel checkout (no alerts/config.yml): pass --root", file=sys.stderr)
        return 2
    files = generated_files(root)
    problems = _problems(build_all())
    if args.check:
        for path, text in files.items():
            if not path.is_file() or path.read_text() != text:
                problems.append(f"{path.relative_to(root)} is stale: run `vllm-otel dashboards build`")
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print(f"{len(files)} generated files up to date")
        return 1 if problems else 0
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(files)} files under {root}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboards", help="build, check and push the Grafana dashboards",
                       description="The four Grafana dashboards are generated from Python "
                                   "(vllm_otel/dashboards). build writes dashboards/*.json and the "
                                   "Kubernetes manifests made from them and from alerts/; push uploads "
                                   "the dashboards to a running Grafana.")
    sp = p.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)
    b = sp.add_parser("build", help="write the generated files (or --check them)")
    b.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when a committed file is stale or a query names an "
                        "unknown metric")
    b.add_argument("--root", help="repository root (default: this checkout)")
    b.set_defaults(func=cmd_build)
    from vllm_otel.dashboards.push import add_push_parser

    add_push_parser(sp)
