"""Our entry points are safe to load and call in any vLLM process, any number of times."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import pytest

import vllm_otel.instrument.plugin as plugin
from vllm_otel.instrument.guard import guarded, hook_errors


def _ours(group: str):
    return [ep for ep in entry_points(group=group) if ep.name == "vllm_otel"]


@pytest.mark.parametrize("group", ["vllm.general_plugins", "vllm.stat_logger_plugins",
                                   "vllm.endpoint_plugins"])
def test_entry_points_registered_and_loadable(group):
    eps = _ours(group)
    assert len(eps) == 1, f"vllm_otel not registered in {group}"
    assert eps[0].load() is not None


def test_stat_logger_is_a_vllm_stat_logger():
    pytest.importorskip("vllm")
    from vllm.v1.metrics.loggers import StatLoggerBase

    cls = _ours("vllm.stat_logger_plugins")[0].load()
    assert issubclass(cls, StatLoggerBase)  # vLLM raises TypeError at start-up otherwise


def test_endpoint_plugin_satisfies_vllm_protocol():
    pytest.importorskip("vllm")
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    obj = _ours("vllm.endpoint_plugins")[0].load()()
    assert isinstance(obj, EndpointPlugin)
    assert obj.name == "vllm_otel"  # the name VLLM_PLUGINS must list


def test_general_plugin_is_idempotent(monkeypatch):
    monkeypatch.setattr(plugin, "_registered_pid", None)
    calls = []
    monkeypatch.setattr("vllm_otel.config.load_config", lambda *a, **k: calls.append(1) or
                        __import__("vllm_otel.config", fromlist=["MonitorConfig"]).MonitorConfig())
    plugin.register()
    plugin.register()
    plugin.register()
    assert plugin.is_registered()
    assert len(calls) == 1


def test_general_plugin_swallows_its_own_failure(monkeypatch, caplog):
    import vllm_otel.config as config

    def broken() -> None:  # a bug deep inside registration, injected from here
        raise RuntimeError("deliberate failure while registering")

    monkeypatch.setattr(plugin, "_registered_pid", None)
    monkeypatch.setattr(config, "load_config", broken)
    before = hook_errors["general_plugin.register"]
    with caplog.at_level(logging.WARNING, logger="vllm_otel"):
        assert plugin.register() is None  # no exception reaches the caller (vLLM)
    assert hook_errors["general_plugin.register"] == before + 1


def test_bad_config_disables_monitoring_instead_of_raising(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(plugin, "_registered_pid", None)
    bad = tmp_path / "monitor_config.json"
    bad.write_text("{broken")
    monkeypatch.setenv("VLLM_MONITOR_CONFIG", str(bad))
    with caplog.at_level(logging.WARNING, logger="vllm_otel"):
        plugin.register()
    assert "not valid JSON" in caplog.text


def test_guard_logs_first_failure_loudly_then_quietly(caplog):
    @guarded("test.flaky", default="fallback")
    def boom():
        raise ValueError("x")

    with caplog.at_level(logging.DEBUG, logger="vllm_otel"):
        assert boom() == "fallback"
        assert boom() == "fallback"
    levels = [r.levelno for r in caplog.records if "test.flaky" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG]
    assert hook_errors["test.flaky"] == 2
