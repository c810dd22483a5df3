"""Every alert rule file passes promtool's checks and its unit tests, and carries the labels and
annotations an on-call engineer needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
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


def test_alert_names_are_unique_across_files():
    names = [rule["alert"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
             for rule in g["rules"] if "alert" in rule]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_the_issue_s_areas_are_covered():
    names = {rule["alert"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
             for rule in g["rules"] if "alert" in rule}
    assert {"VllmTtftSloBurnFast", "VllmItlSloBurnFast", "VllmE2eSloBurnFast", "VllmRequestErrors",
            "VllmHttp5xx", "VllmTargetAbsent", "VllmOtelForecasterAbsent", "VllmOtelReceiverAbsent",
            "VllmGpuXidError", "VllmGpuEccUncorrectable", "VllmGpuRowRemapFailure", "VllmGpuThermalSlowdown",
            "VllmGpuClocksThrottled", "VllmOtelKillSwitchEngaged", "VllmOtelWorkerHeartbeatStale",
            "VllmOtelWebhookErrors", "VllmOtelApprovalsWaiting", "VllmOtelEscalation", "VllmOtelOtlpDropping",
            "VllmOtelHookErrors"} <= names


def test_thresholds_and_selectors_live_in_one_config(tmp_path: Path):
    """Changing alerts/config.yml changes the generated rules, and only through the build."""
    from vllm_otel.dashboards.alertpack import load_config, rule_files

    (tmp_path / "alerts").mkdir()
    cfg = load_config(ROOT)
    assert {(ROOT / p).read_text() for p in rule_files(ROOT)} == {t for t in rule_files(ROOT).values()}
    cfg["selectors"]["vllm_job"] = "inference"
    cfg["slo"]["ttft"]["le"] = "5.0"
    cfg["pipeline"]["heartbeat_stale_s"] = 300
    (tmp_path / "alerts" / "config.yml").write_text(yaml.safe_dump(cfg))
    out = {p.name: yaml.safe_load(t) for p, t in rule_files(tmp_path).items()}
    rules = {r["alert"]: r for f in out.values() for g in f["groups"] for r in g["rules"]}
    assert 'le="5.0"' in rules["VllmTtftSloBurnFast"]["expr"] and 'job="inference"' in rules["VllmHttp5xx"]["expr"]
    assert rules["VllmTargetAbsent"]["expr"] == 'absent(up{job="inference"})'
    assert rules["VllmOtelWorkerHeartbeatStale"]["expr"].endswith("> 300")


# --- Alertmanager ------------------------------------------------------------------------------------

AM_CONFIG = ROOT / "alerts" / "alertmanager.yml"


def _amtool() -> str:
    exe = shutil.which("amtool")
    if not exe:
        pytest.fail("amtool not on PATH: run scripts/setup.sh (Debian package prometheus-alertmanager)")
    return exe


def test_amtool_check_config():
    r = subprocess.run([_amtool(), "check-config", str(AM_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("labels, receivers", [
    # a warning the receiver can act on reaches no human unless automation escalates
    ("alertname=VllmKvCacheNearlyFull severity=warning instance=a:8000", "vllm-otel-receiver,blackhole"),
    # critical symptoms go to the receiver and page a human
    ("alertname=VllmEngineStalled severity=critical instance=a:8000", "vllm-otel-receiver,humans"),
    # the pipeline's own alerts and hardware faults: humans only
    ("alertname=VllmOtelEscalation severity=warning", "humans"),
    ("alertname=VllmOtelMitigationCircuitOpen severity=critical", "humans"),
    ("alertname=VllmGpuXidError severity=critical instance=a:8000", "humans"),
    ("alertname=VllmTargetAbsent severity=critical job=vllm", "humans"),
    ("alertname=VllmTtftSloBurnSlow severity=warning instance=a:8000", "humans"),
    # a forecast reaches the receiver once, whatever its name, by its failure_type
    ("alertname=VllmOtelFailurePredicted severity=warning failure_type=kv_cache_exhaustion", "vllm-otel-receiver,humans"),
    ("alertname=VllmKvCacheExhaustionPredicted severity=warning failure_type=kv_cache_exhaustion",
     "vllm-otel-receiver,blackhole"),
])
def test_alertmanager_routes(labels: str, receivers: str):
    r = subprocess.run([_amtool(), "config", "routes", "test", "--config.file", str(AM_CONFIG), *labels.split()],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == receivers


def test_receiver_route_authenticates_and_sends_resolves_one_alert_at_a_time():
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    rx = next(r for r in cfg["receivers"] if r["name"] == "vllm-otel-receiver")["webhook_configs"][0]
    assert rx["http_config"]["authorization"]["credentials_file"]
    assert "credentials" not in rx["http_config"]["authorization"], "never a token inline"
    assert rx["send_resolved"] is True and rx["url"].endswith("/webhook")
    route = next(r for r in cfg["route"]["routes"] if r["receiver"] == "vllm-otel-receiver")
    assert route["group_by"] == ["..."] and route["continue"] is True
    assert route["group_interval"] == "30s"
    inhibit = {tuple(i["source_matchers"]): i for i in cfg["inhibit_rules"]}
    assert inhibit[('alertname = "VllmTargetDown"',)]["equal"] == ["instance"]
