"""The package's layout as a contract: imports flow one way through the stages of the loop.

``instrument/`` runs inside vLLM and must stay light, so it imports nothing from the services;
the services never reach into ``testing/`` (only the demo does); ``learn/`` sits below
``mitigate/``; and no two top-level packages import each other. A package's ``cli.py`` is where
the stages are wired together for a command, so it may import across.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "vllm_otel"

SERVICES = {"forecast", "mitigate", "learn", "dashboards", "loadgen", "status", "prestartup"}
# What each area may not import, and why.
FORBIDDEN: dict[str, tuple[set[str], str]] = {
    "instrument": (SERVICES | {"testing", "demo", "cli"}, "it runs inside vLLM"),
    "telemetry": (SERVICES | {"instrument", "testing", "demo", "cli"}, "both vLLM's plugins and the services use it"),
    "forecast": ({"instrument", "mitigate", "learn", "testing", "demo"}, "a service reads series, it is not part of vLLM"),
    "learn": ({"instrument", "forecast", "mitigate", "testing", "demo"}, "the receiver uses the learner, not the other way"),
    "mitigate": ({"instrument", "forecast", "testing", "demo"}, "it acts through endpoints, not through vLLM's code"),
    "dashboards": ({"testing", "demo", "mitigate", "learn", "forecast"}, "a dashboard reads metric names only"),
}


def _imports() -> dict[Path, set[str]]:
    """Every ``vllm_otel.*`` module each file imports, at any depth (lazy imports count too)."""
    found: dict[Path, set[str]] = defaultdict(set)
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        package = parts[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            found[f].update(n for n in names if n.startswith("vllm_otel."))
    return found


def _area(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else Path(rel[0]).stem


def _is_wiring(path: Path) -> bool:
    return path.name == "cli.py"


def _target_area(module: str) -> str:
    return module.split(".")[1]


def test_no_area_imports_what_it_must_not() -> None:
    bad = []
    for f, mods in _imports().items():
        area = _area(f)
        if area not in FORBIDDEN or _is_wiring(f):
            continue
        forbidden, why = FORBIDDEN[area]
        for m in sorted(mods):
            if _target_area(m) in forbidden:
                bad.append(f"{f.relative_to(PKG.parent)} imports {m} ({area}/: {why})")
    assert not bad, "\n".join(bad)


def test_only_the_demo_uses_the_testing_fixtures() -> None:
    bad = [f"{f.relative_to(PKG.parent)} imports {m}" for f, mods in _imports().items() for m in mods
           if _target_area(m) == "testing" and _area(f) not in {"testing", "demo"} and not _is_wiring(f)]
    assert not bad, "\n".join(bad)


def test_no_two_areas_import_each_other() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for f, mods in _imports().items():
        if _is_wiring(f) or f.name in {"__init__.py", "__main__.py"} and f.parent == PKG:
            continue
        for m in mods:
            if _target_area(m) != _area(f):
                edges[_area(f)].add(_target_area(m))
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, set()))
    assert not cycles, cycles


@pytest.mark.parametrize("name", ["offline.py", "models.py", "store.py", "otel.py"])
def test_one_meaning_per_file_name(name: str) -> None:
    holders = sorted(str(f.relative_to(PKG.parent)) for f in PKG.rglob(name))
    assert len(holders) <= 1, f"{name} means different things in {holders}"


def test_every_test_is_a_unit_or_an_integration_test() -> None:
    tests = PKG.parent / "tests"
    flat = sorted(p.name for p in tests.glob("test_*.py"))
    assert not flat, f"put these in tests/unit/ (no services) or tests/integration/: {flat}"
