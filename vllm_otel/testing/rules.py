"""Load the project's alert rules with shorter hold times for live tests and the demo.

The expressions are exactly the shipped ones; only ``for:`` (and ``keep_firing_for:``) change, so an alert that would page
after minutes in production fires within seconds on a short run. The real hold times are covered
by the promtool unit tests in ``alerts/tests/``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["rules_with_short_for", "repo_root", "default_alert_rules", "default_traces_dir"]


def repo_root() -> Path | None:
    """The source checkout holding this package, when running from one (editable install)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() and (here / "alerts").is_dir() else None


def default_alert_rules() -> list[Path]:
    root = repo_root()
    return sorted((root / "alerts").glob("*.rules.yml")) if root else []


def default_traces_dir() -> Path:
    """``$VLLM_OTEL_TRACES_DIR`` when set, else the traces shipped with the package."""
    from vllm_otel.loadgen.traces import default_traces_dir as _shipped

    return _shipped()


def rules_with_short_for(rule_file: str | Path, out_file: str | Path, hold: str = "1s",
                         keep_firing: str = "5s") -> Path:
    """``for:`` becomes ``hold`` and ``keep_firing_for:`` becomes ``keep_firing``."""
    doc = yaml.safe_load(Path(rule_file).read_text())
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            if "alert" in rule and "for" in rule:
                rule["for"] = hold
            if "alert" in rule and "keep_firing_for" in rule:
                rule["keep_firing_for"] = keep_firing
    out = Path(out_file)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out
