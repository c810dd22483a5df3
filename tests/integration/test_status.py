"""`vllm-otel status` against a real deployment: the session's vLLM server, a real forecaster
scraping it and a real receiver holding one dry-run action."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.receiver_support import am_alert, am_payload
from vllm_otel.testing.processes import ManagedProcess, free_port

TOKEN = "status-test-token-81c2"


def _wait(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.3)


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vllm_otel", "status", *args], capture_output=True,
                          text=True, timeout=60)


def test_unreachable_parts_are_reported_and_the_rest_shown(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    r = _status("--url", dead, "--receiver", dead, "--json")
    assert r.returncode == 1
    st = json.loads(r.stdout)
    assert "Connect" in st["vllm"]["error"] and "Connect" in st["receiver"]["error"]
    assert _status().returncode == 2  # nothing to look at: a usage error


def test_session_vllm_passed_the_prestartup_check_once(vllm_server):
    """conftest starts vLLM with VLLM_MONITOR_PRESTARTUP_CHECK=true: it ran once (not again in the
    engine core), found no error, and vLLM serves."""
    log = vllm_server.proc.log_path.read_text(errors="replace")
    assert log.count("pre-startup check (exit") == 1
    assert "pre-startup check (exit 2)" not in log and "refusing to start" not in log
    assert httpx.get(f"{vllm_server.url}/v1/models").status_code == 200


def test_status_of_a_running_deployment(vllm_server, tmp_path: Path):
    from tests.conftest import CONTROL_TOKEN  # the session vLLM's monitoring routes want it

    token_file = tmp_path / "token"  # Alertmanager's intake token
    token_file.write_text(TOKEN)
    operator_file = tmp_path / "operator"  # what `status` reads the audit trail with
    operator_file.write_text("status-test-operator-credential")
    vllm_token_file = tmp_path / "vllm-token"
    vllm_token_file.write_text(CONTROL_TOKEN)
    instance = vllm_server.url.removeprefix("http://")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "targets": [{"instance": instance}], "default_mode": "dry-run",
        "rules": [{"alertname": "VllmKvCacheNearlyFull", "strategies": ["escalate_to_human"]}],
        "strategies": {"escalate_to_human": {"params": {"url": "http://127.0.0.1:9/hook"}}}}))
    rport, fport = free_port(), free_port()
    receiver = ManagedProcess("receiver", [sys.executable, "-m", "vllm_otel", "receiver", "--config", str(policy),
                                           "--port", str(rport), "--token-file", str(token_file),
                                           "--operator", f"ops={operator_file}",
                                           "--db-url", f"sqlite:///{tmp_path / 'r.db'}"], tmp_path / "receiver.log")
    forecaster = ManagedProcess("forecaster", [sys.executable, "-m", "vllm_otel", "forecaster", "--scrape",
                                               f"{vllm_server.url}/metrics", "--interval", "1",
                                               "--listen", f"127.0.0.1:{fport}"], tmp_path / "forecaster.log")
    rurl, furl = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{fport}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with receiver, forecaster:
        _wait(lambda: httpx.get(f"{rurl}/healthz").status_code == 200)
        assert httpx.post(f"{rurl}/webhook", json=am_payload(am_alert(instance=instance)),
                          headers=auth).status_code == 202
        ops = {"Authorization": "Bearer status-test-operator-credential"}
        _wait(lambda: httpx.get(f"{rurl}/actions", headers=ops).json()["count"] >= 1)
        _wait(lambda: "vllm_otel_forecaster_up 1.0" in httpx.get(f"{furl}/metrics").text)
        args = ("--url", vllm_server.url, "--forecaster", furl, "--receiver", rurl,
                "--receiver-token-file", str(operator_file), "--vllm-token-file", str(vllm_token_file))
        r = _status(*args, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        st = json.loads(r.stdout)
        engine = st["vllm"]["engines"]["0"]
        assert st["vllm"]["source"] == "/monitoring/status"
        assert engine["lifecycle_state"] and engine["stalled"] is False and st["vllm"]["in_flight"] >= 0
        assert st["forecaster"]["up"] is True and st["forecaster"]["instances"] >= 1
        action = st["receiver"]["actions"][0]
        assert (action["alertname"], action["strategy"], action["mode"]) == \
            ("VllmKvCacheNearlyFull", "escalate_to_human", "dry-run")
        text = _status(*args)
        assert text.returncode == 0
        for needle in ("vLLM", engine["lifecycle_state"], "Forecaster", "Receiver", "escalate_to_human"):
            assert needle in text.stdout
        # Without the token the receiver part says why, the rest is still shown.
        r = _status("--url", vllm_server.url, "--receiver", rurl, "--json")
        st = json.loads(r.stdout)
        assert r.returncode == 1 and "token" in st["receiver"]["error"] and "engines" in st["vllm"]
