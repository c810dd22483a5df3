"""Every alert rule file passes promtool's checks and its unit tests, and carries the labels and
annotations an on-call engineer needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((ROOT / "alerts").glob("*.rules.yml"))


def _promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        pytest.fail("promtool not on PATH: run scripts/setup.sh")
    return exe


def test_there_are_rule_files():
    assert RULE_FILES


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(rule_file: Path):
    r = subprocess.run([_promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests(rule_file: Path):
    test_file = ROOT / "alerts" / "tests" / rule_file.name.replace(".rules.yml", ".test.yml")
    assert test_file.is_file(), f"every rule file needs a promtool test file: {test_file}"
    r = subprocess.run([_promtool(), "test", "rules", test_file.name], capture_output=True, text=True,
                       cwd=test_file.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    # Every alert of the file is exercised by its test file.
    alerts = {rule["alert"] for g in yaml.safe_load(rule_file.read_text())["groups"]
              for rule in g["rules"] if "alert" in rule}
    tested = {t["alertname"] for case in yaml.safe_load(test_file.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert alerts <= tested, f"untested alerts: {alerts - tested}"


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_alerts_follow_conventions(rule_file: Path):
    for group in yaml.safe_load(rule_file.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["alert"].startswith("Vllm"), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            for key in ("summary", "description", "runbook_url"):
                assert rule["annotations"].get(key), f"{rule['alert']} lacks {key}"
            assert "{{" not in rule["annotations"]["summary"], "summary stays static"
            anchor = rule["annotations"]["runbook_url"].split("#")[-1]
            assert anchor == rule["alert"].lower()
            runbook = (ROOT / "docs" / "runbooks.md").read_text().lower()
            assert f"## {rule['alert'].lower()}" in runbook, f"no runbook section for {rule['alert']}"
