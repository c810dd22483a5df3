from __future__ import annotations

import json

import pytest

from vllm_otel.config import ConfigError, load_config


def test_defaults_without_file_or_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(env={})
    assert cfg.enabled and cfg.mitigation_threshold == 0.7
    assert cfg.enable_auto_mitigation is False  # acting on vLLM is opt-in


def test_file_then_env_precedence(tmp_path):
    f = tmp_path / "monitor_config.json"
    f.write_text(json.dumps({"mitigation_threshold": 0.8, "enable_learning": False,
                             "plugin_directory": "/opt/plugins"}))
    cfg = load_config(f, env={"VLLM_MONITOR_MITIGATION_THRESHOLD": "0.9", "VLLM_ENABLE_MONITORING": "false",
                              "VLLM_MONITOR_AUTO_MITIGATE": "yes"})
    assert cfg.mitigation_threshold == 0.9          # env wins over file
    assert cfg.enable_learning is False             # from file
    assert cfg.plugin_directory == "/opt/plugins"
    assert cfg.enabled is False
    assert cfg.enable_auto_mitigation is True       # the spec's VLLM_MONITOR_AUTO_MITIGATE spelling


def test_config_file_from_env_var(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{"log_level": "debug"}')
    assert load_config(env={"VLLM_MONITOR_CONFIG": str(f)}).log_level == "DEBUG"


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"mitigation_threshold": 3}', "mitigation_threshold"),
    ('{"no_such_option": 1}', "no_such_option"),
])
def test_bad_file_gives_clear_error(tmp_path, content, needle):
    f = tmp_path / "monitor_config.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(f, env={})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="VLLM_MONITOR_PREDICTIVE"):
        load_config(env={"VLLM_MONITOR_PREDICTIVE": "maybe"})


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json", env={})
