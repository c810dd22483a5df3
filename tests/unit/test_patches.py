"""vllm_otel.instrument.patches on vLLM's real classes: install is idempotent, keeps vLLM's
original as __wrapped__ (with its descriptor kind), and uninstall puts back exactly what was
there. No vLLM server is started: the classes are patched in this process."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("vllm")

from vllm import LLM  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.engine.core import EngineCore  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402
from vllm.v1.engine.output_processor import OutputProcessor  # noqa: E402
import vllm.logger as vllm_logging  # noqa: E402

from vllm_otel.instrument import patches  # noqa: E402

TARGETS = [(OutputProcessor, "abort_requests"), (LLMEngine, "from_engine_args"), (EngineArgs, "add_cli_args"),
           (vllm_logging, "_configure_vllm_root_logger"), (LLM, "get_monitoring_status"),
           (EngineCore, "vllm_otel_control")]


@pytest.fixture()
def clean():
    patches.uninstall()
    before = {t: vars(t[0]).get(t[1]) for t in TARGETS}
    yield before
    patches.uninstall()


def test_uninstall_restores_every_original(clean):
    patches.install(api_server=True)
    assert all(vars(o).get(n) is not clean[(o, n)] for o, n in TARGETS)
    patches.uninstall()
    assert {t: vars(t[0]).get(t[1]) for t in TARGETS} == clean
    assert not hasattr(LLM, "get_monitoring_status") and not hasattr(EngineCore, "vllm_otel_control")
    assert patches.installed() == []


def test_install_twice_patches_once_and_keeps_the_descriptor_kind(clean):
    patches.install(api_server=True)
    first = {t: vars(t[0]).get(t[1]) for t in TARGETS}
    patches.install(api_server=True)
    assert {t: vars(t[0]).get(t[1]) for t in TARGETS} == first
    raw = vars(LLMEngine)["from_engine_args"]
    assert isinstance(raw, classmethod) and raw.__func__.__wrapped__ is clean[(LLMEngine, "from_engine_args")].__func__
    raw = vars(EngineArgs)["add_cli_args"]
    assert isinstance(raw, staticmethod)
    assert OutputProcessor.abort_requests.__wrapped__ is clean[(OutputProcessor, "abort_requests")]
    # Wrapped once: the wrapper's original is vLLM's, not another wrapper.
    assert not hasattr(OutputProcessor.abort_requests.__wrapped__, "__wrapped__")


def test_engine_side_processes_get_only_the_engine_patches(clean):
    patches.install(api_server=False)
    assert set(patches.installed()) == {"EngineCore.vllm_otel_control", "WorkerBase.vllm_otel_gc",
                                        "vllm.logger._configure_vllm_root_logger"}
    assert vars(OutputProcessor)["abort_requests"] is clean[(OutputProcessor, "abort_requests")]


def test_the_patched_parser_takes_enable_monitoring(clean, monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_MONITORING", raising=False)
    patches.install(api_server=True)
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--enable-monitoring"])
    assert ns.enable_monitoring is True
    import os

    assert os.environ["VLLM_ENABLE_MONITORING"] == "true"
    patches.uninstall()
    with pytest.raises(SystemExit):
        EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(["--enable-monitoring"])


def test_plain_vllm_llm_reports_when_monitoring_is_off(clean):
    patches.install(api_server=True)
    status = LLM.get_monitoring_status(object())
    assert status["enabled"] is False and "VLLM_ENABLE_MONITORING" in status["note"]
