"""One typed configuration for the code vllm-otel runs inside vLLM and for its command-line tools.

Sources, later ones winning: built-in defaults < ``monitor_config.json`` (path from
``VLLM_MONITOR_CONFIG``, else ``./monitor_config.json`` when present) < ``VLLM_MONITOR_*`` /
``VLLM_ENABLE_MONITORING`` environment variables < command-line flags (``overrides``). Standard
``OTEL_*`` variables are *not* copied here: the OpenTelemetry SDK reads them itself, and our
exporters honour them (see ``vllm_otel.telemetry``); duplicating them would create two
sources of truth.

Every field is read by the part it names (the table in the README says where). An unknown key,
an unknown ``VLLM_MONITOR_*`` variable or a bad value raises :class:`ConfigError` naming the key,
the value and the source; code running inside vLLM catches it and disables monitoring in that
process (it must never take vLLM down).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["MonitorConfig", "ConfigError", "load_config", "ENV_PREFIX", "CONFIG_FILE_ENV", "REMOVED"]

ENV_PREFIX = "VLLM_MONITOR_"
CONFIG_FILE_ENV = "VLLM_MONITOR_CONFIG"
DEFAULT_CONFIG_FILE = "monitor_config.json"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# Settings of the spec that this project does elsewhere, per service, with the setting that does it.
# A user who sets one gets an error saying where it went, instead of a setting that does nothing.
REMOVED = {
    "enable_predictive": "predictions come from the forecaster: run (or do not run) `vllm-otel forecaster`",
    "enable_learning": "the receiver's policy file chooses its learner (see examples/policy.yaml)",
    "enable_auto_mitigation": "the receiver's policy file sets default_mode (dry_run, approve, auto) "
                              "and each rule's mode",
    "mitigation_threshold": "the alert rules (alerts/) decide when a prediction becomes an alert, "
                            "and the receiver's policy which alerts are acted on",
    "learning_rate": "the learner's parameters live in the receiver's policy file",
    "collect_interval_s": "host and GPU readings refresh every 5 s, at scrape time at the latest",
}
# The spec's spellings of removed variables, so their error names what the user typed.
_ENV_ALIASES = {"PREDICTIVE": "enable_predictive", "LEARNING": "enable_learning",
                "AUTO_MITIGATE": "enable_auto_mitigation"}


class ConfigError(ValueError):
    """The configuration could not be loaded; the message names the key, the value and the source."""


class MonitorConfig(BaseModel):
    """Everything a user can set. Field names double as ``VLLM_MONITOR_<NAME>`` variables."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="VLLM_ENABLE_MONITORING: master switch for code inside vLLM")
    log_level: str = Field("INFO", description="level of the vllm_otel logger inside vLLM")
    prestartup_check: bool = Field(False, description="run the pre-startup check before vLLM starts "
                                                      "(general plugin, vllm-otel supervise); refuse to start "
                                                      "on errors")
    plugin_directory: str | None = Field(None, description="directory of plugin modules the receiver loads "
                                                           "and hot-reloads (vllm-otel receiver)")
    instance: str | None = Field(None, description="instance label; default host:port of the vLLM server")
    stall_timeout_s: float = Field(30.0, gt=0, description="no token for this long while requests run => stalled")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {v!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
        return v


def _parse_env_value(raw: str, annotation: Any) -> Any:
    """Turn an environment string into what pydantic expects; booleans accept the usual spellings."""
    if annotation is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"expected a boolean (true/false/1/0), got {raw!r}")
    if raw == "" and type(None) in getattr(annotation, "__args__", ()):
        return None
    return raw


def _unknown(key: str, value: Any, source: str) -> ConfigError:
    field = _ENV_ALIASES.get(key, key)
    if field in REMOVED:
        return ConfigError(f"{key}={value!r} ({source}): this setting is not used by vllm-otel: {REMOVED[field]}")
    known = ", ".join(MonitorConfig.model_fields)
    return ConfigError(f"{key}={value!r} ({source}): unknown setting; known: {known}")


def _env_overrides(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    fields = MonitorConfig.model_fields
    if "VLLM_ENABLE_MONITORING" in env:
        try:
            out["enabled"] = (_parse_env_value(env["VLLM_ENABLE_MONITORING"], bool), "VLLM_ENABLE_MONITORING")
        except ConfigError as e:
            raise ConfigError(f"VLLM_ENABLE_MONITORING: {e}") from None
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_FILE_ENV:
            continue
        name = key[len(ENV_PREFIX):]
        field = name.lower()
        if field not in fields:
            raise _unknown(name if name in _ENV_ALIASES else field, raw, f"environment variable {key}")
        try:
            out[field] = (_parse_env_value(raw, fields[field].annotation), f"environment variable {key}")
        except ConfigError as e:
            raise ConfigError(f"{field}={raw!r} (environment variable {key}): {e}") from None
    return out


def _config_file(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if path:
        return Path(path)
    if env.get(CONFIG_FILE_ENV):
        return Path(env[CONFIG_FILE_ENV])
    return Path(DEFAULT_CONFIG_FILE) if Path(DEFAULT_CONFIG_FILE).is_file() else None


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> MonitorConfig:
    """Build the config from defaults, the JSON file, the environment and ``overrides`` (command-line
    flags; None values mean "flag not given"), in that order."""
    env = os.environ if env is None else env
    data: dict[str, tuple[Any, str]] = {}
    file = _config_file(path, env)
    if file is not None:
        try:
            loaded = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {file} is not valid JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a JSON object")
        for k, v in loaded.items():
            if k not in MonitorConfig.model_fields:
                raise _unknown(k, v, f"config file {file}")
            data[k] = (v, f"config file {file}")
    data.update(_env_overrides(env))
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in MonitorConfig.model_fields:
            raise _unknown(k, v, "command line")
        data[k] = (v, "command line")
    try:
        return MonitorConfig(**{k: v for k, (v, _) in data.items()})
    except ValidationError as e:
        first = e.errors()[0]
        key = str(first["loc"][0]) if first.get("loc") else "?"
        value, source = data.get(key, (first.get("input"), "?"))
        raise ConfigError(f"{key}={value!r} ({source}): {first['msg']}") from None
