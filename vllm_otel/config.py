"""One typed configuration for every part of vllm-otel.

Sources, later ones winning: built-in defaults < ``monitor_config.json`` (path from
``VLLM_MONITOR_CONFIG``, else ``./monitor_config.json`` when present) < ``VLLM_MONITOR_*`` /
``VLLM_ENABLE_MONITORING`` environment variables. Standard ``OTEL_*`` variables are *not* copied
here: the OpenTelemetry SDK reads them itself, and our exporters honour them (see
``vllm_otel.instrument.otel``); duplicating them would create two sources of truth.

A bad file or variable raises :class:`ConfigError` with a message naming the source; code running
inside vLLM catches it and falls back to defaults (it must never take vLLM down).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["MonitorConfig", "ConfigError", "load_config", "ENV_PREFIX", "CONFIG_FILE_ENV"]

ENV_PREFIX = "VLLM_MONITOR_"
CONFIG_FILE_ENV = "VLLM_MONITOR_CONFIG"
DEFAULT_CONFIG_FILE = "monitor_config.json"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """The configuration could not be loaded; the message says which source and which field."""


class MonitorConfig(BaseModel):
    """Everything a user can set. Field names double as ``VLLM_MONITOR_<NAME>`` variables."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="VLLM_ENABLE_MONITORING: master switch for code inside vLLM")
    enable_predictive: bool = True
    enable_learning: bool = True
    enable_auto_mitigation: bool = False  # acting on vLLM is opt-in
    mitigation_threshold: float = Field(0.7, ge=0.0, le=1.0)
    learning_rate: float = Field(0.1, gt=0.0, le=1.0)
    log_level: str = "INFO"
    prestartup_check: bool = False
    plugin_directory: str | None = None
    # Instance identity for labels; defaults to host:port of the vLLM server when known.
    instance: str | None = None
    # Forward-progress (hang) detection: no token for this long while requests run => stalled.
    stall_timeout_s: float = Field(30.0, gt=0)
    # How often in-process collectors (host, GPU) refresh, seconds.
    collect_interval_s: float = Field(5.0, gt=0)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {v!r}")
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
    return raw


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = MonitorConfig.model_fields
    if "VLLM_ENABLE_MONITORING" in env:
        out["enabled"] = _parse_env_value(env["VLLM_ENABLE_MONITORING"], bool)
    # The spec's spelling (VLLM_MONITOR_PREDICTIVE) and the field spelling
    # (VLLM_MONITOR_ENABLE_PREDICTIVE) both work.
    aliases = {"PREDICTIVE": "enable_predictive", "LEARNING": "enable_learning",
               "AUTO_MITIGATE": "enable_auto_mitigation"}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_FILE_ENV:
            continue
        name = key[len(ENV_PREFIX):]
        field = aliases.get(name, name.lower())
        if field not in fields:
            # Unknown variables are ignored rather than fatal: other tools share the prefix space.
            continue
        try:
            out[field] = _parse_env_value(raw, fields[field].annotation)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    return out


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> MonitorConfig:
    """Build the config from defaults, the JSON file and the environment (in that order)."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    file = Path(path) if path else (Path(env[CONFIG_FILE_ENV]) if env.get(CONFIG_FILE_ENV) else None)
    if file is None and Path(DEFAULT_CONFIG_FILE).is_file():
        file = Path(DEFAULT_CONFIG_FILE)
    if file is not None:
        try:
            loaded = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {file} is not valid JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a JSON object")
        data.update(loaded)
    data.update(_env_overrides(env))
    try:
        return MonitorConfig(**data)
    except ValidationError as e:
        src = f"{file} / environment" if file else "environment"
        raise ConfigError(f"invalid monitoring config ({src}): {e}") from None
