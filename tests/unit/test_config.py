"""MonitorConfig: precedence, clear errors, and each field changing what it names.

Where each field is proved to act: enabled, log_level, prestartup_check, instance, stall_timeout_s
here (stall_timeout_s also end to end on real vLLM in test_telemetry_e2e's stall test, through
VLLM_MONITOR_STALL_TIMEOUT_S); prestartup_check refusing to start in test_prestartup_check;
plugin_directory in test_plugins (the receiver loads its plugins from it).
"""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import pytest

from vllm_otel.config import REMOVED, ConfigError, MonitorConfig, load_config


def test_defaults_without_file_or_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(env={})
    assert cfg == MonitorConfig()
    assert cfg.enabled and cfg.prestartup_check is False and cfg.plugin_directory is None


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "monitor_config.json"
    f.write_text(json.dumps({"stall_timeout_s": 10, "log_level": "debug", "plugin_directory": "/opt/plugins",
                             "instance": "from-file"}))
    env = {"VLLM_MONITOR_STALL_TIMEOUT_S": "20", "VLLM_MONITOR_INSTANCE": "from-env",
           "VLLM_ENABLE_MONITORING": "false"}
    cfg = load_config(f, env=env, overrides={"instance": "from-flag", "log_level": None})
    assert cfg.stall_timeout_s == 20            # env wins over file
    assert cfg.log_level == "DEBUG"             # file wins over default; a flag not given (None) changes nothing
    assert cfg.plugin_directory == "/opt/plugins"
    assert cfg.instance == "from-flag"          # flags win over everything
    assert cfg.enabled is False


def test_config_file_from_env_var(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{"log_level": "warning"}')
    assert load_config(env={"VLLM_MONITOR_CONFIG": str(f)}).log_level == "WARNING"


@pytest.mark.parametrize("content, needles", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["must hold a JSON object"]),
    ('{"stall_timeout_s": -3}', ["stall_timeout_s=-3", "config file", "greater than 0"]),
    ('{"no_such_option": 1}', ["no_such_option=1", "config file", "unknown setting", "stall_timeout_s"]),
    ('{"log_level": "loud"}', ["log_level='loud'", "config file", "unknown log level"]),
    ('{"mitigation_threshold": 0.7}', ["mitigation_threshold=0.7", "not used by vllm-otel", "alert rules"]),
])
def test_bad_file_gives_clear_error_naming_key_value_and_source(tmp_path, content, needles):
    f = tmp_path / "monitor_config.json"
    f.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    for n in needles:
        assert n in str(e.value)
    if "config file" in needles:
        assert str(f) in str(e.value)


@pytest.mark.parametrize("env, needles", [
    ({"VLLM_MONITOR_PRESTARTUP_CHECK": "maybe"},
     ["prestartup_check='maybe'", "VLLM_MONITOR_PRESTARTUP_CHECK", "boolean"]),
    ({"VLLM_MONITOR_STALL_TIMEOUT_S": "soon"}, ["stall_timeout_s='soon'", "VLLM_MONITOR_STALL_TIMEOUT_S"]),
    ({"VLLM_MONITOR_PREDICTIVE": "true"}, ["PREDICTIVE='true'", "VLLM_MONITOR_PREDICTIVE", "forecaster"]),
    ({"VLLM_MONITOR_AUTO_MITIGATE": "yes"}, ["VLLM_MONITOR_AUTO_MITIGATE", "default_mode"]),
    ({"VLLM_MONITOR_TYPO_FIELD": "1"}, ["typo_field='1'", "VLLM_MONITOR_TYPO_FIELD", "unknown setting"]),
    ({"VLLM_ENABLE_MONITORING": "perhaps"}, ["VLLM_ENABLE_MONITORING", "perhaps"]),
])
def test_bad_env_gives_clear_error_naming_key_value_and_source(env, needles):
    with pytest.raises(ConfigError) as e:
        load_config(env=env)
    for n in needles:
        assert n in str(e.value)


def test_bad_flag_names_the_command_line():
    with pytest.raises(ConfigError, match=r"stall_timeout_s=0 \(command line\)"):
        load_config(env={}, overrides={"stall_timeout_s": 0})


def test_removed_settings_are_not_fields():
    # The spec's settings that did nothing here are gone, each with the place that does the job.
    assert not set(REMOVED) & set(MonitorConfig.model_fields)
    assert set(MonitorConfig.model_fields) == {"enabled", "log_level", "prestartup_check", "plugin_directory",
                                               "instance", "stall_timeout_s"}


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json", env={})


# --- each field acts --------------------------------------------------------------------------------

@pytest.fixture()
def fresh_plugin(monkeypatch):
    """The general plugin with its vLLM-side installs recorded instead of patched into vLLM."""
    from vllm_otel.instrument import plugin

    installed: list[str] = []
    monkeypatch.setattr(plugin, "_registered_pid", None)
    monkeypatch.setattr("vllm_otel.instrument.patches.install",
                        lambda api_server: installed.append("patches"))
    for k in [k for k in list(__import__("os").environ) if k.startswith("VLLM_MONITOR_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("VLLM_ENABLE_MONITORING", raising=False)
    monkeypatch.setenv("VLLM_OTEL_PRESTARTUP_CHECKED", "")  # a fresh launch (restored afterwards)
    yield plugin, installed
    logging.getLogger("vllm_otel").setLevel(logging.NOTSET)


def test_enabled_switches_the_code_inside_vllm(fresh_plugin, monkeypatch):
    plugin, installed = fresh_plugin
    monkeypatch.setenv("VLLM_ENABLE_MONITORING", "false")
    plugin.register()
    assert installed == []
    monkeypatch.setattr(plugin, "_registered_pid", None)
    monkeypatch.setenv("VLLM_ENABLE_MONITORING", "true")
    plugin.register()
    assert "patches" in installed


def test_log_level_sets_the_vllm_otel_logger(fresh_plugin, monkeypatch):
    plugin, _ = fresh_plugin
    monkeypatch.setenv("VLLM_MONITOR_LOG_LEVEL", "error")
    plugin.register()
    log = logging.getLogger("vllm_otel")
    assert log.level == logging.ERROR and not log.isEnabledFor(logging.WARNING)


def test_prestartup_check_off_means_no_check(fresh_plugin, monkeypatch, tmp_path):
    plugin, installed = fresh_plugin
    # A command the check would refuse (missing model): with the field off vLLM starts unchecked.
    monkeypatch.setattr(sys, "argv", ["/usr/bin/vllm", "serve", str(tmp_path / "missing")])
    plugin.register()
    assert "patches" in installed
    monkeypatch.setattr(plugin, "_registered_pid", None)
    monkeypatch.setenv("VLLM_MONITOR_PRESTARTUP_CHECK", "true")
    with pytest.raises(SystemExit):
        plugin.register()


def test_instance_and_stall_timeout_reach_the_monitor(monkeypatch):
    pytest.importorskip("vllm")
    from prometheus_client import CollectorRegistry

    from vllm_otel.instrument.monitor import EngineMonitor

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    vcfg = SimpleNamespace(model_config=SimpleNamespace(served_model_name=["tiny"], model="/m"),
                           cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=10),
                           observability_config=SimpleNamespace(otlp_traces_endpoint=None),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1,
                                                           data_parallel_size=1))
    cfg = load_config(env={"VLLM_MONITOR_INSTANCE": "edge-7", "VLLM_MONITOR_STALL_TIMEOUT_S": "2.5"})
    m = EngineMonitor(vcfg, cfg, registry=CollectorRegistry())
    try:
        assert m.get_engine_status()["instance"] == "edge-7"
        assert m.stall.timeout_s == 2.5
    finally:
        m.shutdown()
