"""Secret redaction: key names, value shapes, nesting, log records, failing closed."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging

import pytest

from vllm_otel.redact import (
    REDACTED,
    RedactingFilter,
    is_secret_key,
    redact_mapping,
    redact_text,
    redact_value,
)

HF = "hf_abcdefghijklmnopqrstuvwxyz123456"
OPENAI = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# What a real vLLM host's environment looks like: secrets mixed with settings that must survive.
REAL_ENV = {
    "HF_TOKEN": HF,
    "HUGGING_FACE_HUB_TOKEN": HF,
    "OPENAI_API_KEY": OPENAI,
    "AWS_ACCESS_KEY_ID": AWS_ID,
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=abc123def456,x-tenant=acme",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "VLLM_API_KEY": "local-dev-key-42",
    "SENTRY_DSN": "https://publickey@o0.ingest.sentry.io/1",
    "DATABASE_URL": "postgresql://vllm:Sup3rS3cret@db.internal:5432/monitor",
    "PATH": "/usr/local/bin:/usr/bin",
    "HOME": "/home/vllm",
    "CUDA_VISIBLE_DEVICES": "0,1",
    "VLLM_HOST_IP": "10.0.0.5",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HOME": "/models/hf",
    "OTEL_SERVICE_NAME": "vllm",
}
SECRETS = [HF, OPENAI, AWS_ID, AWS_SECRET, "abc123def456", "0123456789abcdef01234567",
           "local-dev-key-42", "publickey", "Sup3rS3cret"]


@pytest.mark.parametrize("key", [
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID", "WANDB_API_KEY", "VLLM_API_KEY", "api_key", "apiKey", "accessToken",
    "Authorization", "proxy-authorization", "x-api-key", "Cookie", "SESSION_ID", "PGPASSWORD",
    "db_passwd", "GOOGLE_APPLICATION_CREDENTIALS", "private_key", "request_signature",
    "SENTRY_DSN", "MYSQL_PWD", "client_secret", "hfToken",
])
def test_secret_key_names(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", [
    # vLLM arguments and settings that merely contain a secret-ish word must stay readable.
    "max_num_batched_tokens", "max_tokens", "tokenizer", "tokenizer_mode", "skip_tokenizer_init",
    "TOKENIZERS_PARALLELISM", "author", "ssl_keyfile", "HF_HOME", "CUDA_VISIBLE_DEVICES",
    "VLLM_HOST_IP", "model", "kv_cache_dtype", "PATH",
])
def test_non_secret_key_names(key: str) -> None:
    assert not is_secret_key(key)


def test_realistic_environment_is_redacted_but_keeps_settings() -> None:
    out = redact_mapping(REAL_ENV)
    dumped = json.dumps(out)
    for secret in SECRETS:
        assert secret not in dumped, secret
    for key in ("HF_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY",
                "VLLM_API_KEY", "OTEL_EXPORTER_OTLP_HEADERS", "SENTRY_DSN"):
        assert out[key] == REDACTED, key
    # Non-secret key with credentials inside the value: only the password goes.
    assert out["DATABASE_URL"] == f"postgresql://vllm:{REDACTED}@db.internal:5432/monitor"
    for key in ("PATH", "HOME", "CUDA_VISIBLE_DEVICES", "VLLM_HOST_IP", "TOKENIZERS_PARALLELISM",
                "HF_HOME", "OTEL_SERVICE_NAME"):
        assert out[key] == REAL_ENV[key], key
    assert REAL_ENV["HF_TOKEN"] == HF  # input untouched


def test_nested_structures() -> None:
    data = {
        "engine": {
            "headers": {"Authorization": "Bearer abc.def.ghi", "Content-Type": "application/json"},
            "argv": ["vllm", "serve", "gpt2", "--api-key", "plainsecret", "--port", "8000"],
            "endpoints": [{"url": "https://bob:hunter2@example.com/v1", "token": 123456}],
        },
        "max_num_batched_tokens": 8192,
        "note": ("log", f"loaded with {HF}"),
    }
    out = redact_mapping(data)
    assert out["engine"]["headers"] == {"Authorization": REDACTED,
                                        "Content-Type": "application/json"}
    assert out["engine"]["argv"] == ["vllm", "serve", "gpt2", "--api-key", REDACTED,
                                     "--port", "8000"]
    assert out["engine"]["endpoints"][0] == {"url": f"https://bob:{REDACTED}@example.com/v1",
                                             "token": REDACTED}
    assert out["max_num_batched_tokens"] == 8192
    assert out["note"] == ["log", f"loaded with {REDACTED}"]
    dumped = json.dumps(out)
    for secret in ("abc.def.ghi", "plainsecret", "hunter2", "123456", HF):
        assert secret not in dumped


def test_unset_secrets_stay_visible_and_non_strings_are_redacted() -> None:
    assert redact_value("HF_TOKEN", None) is None
    assert redact_value("HF_TOKEN", "") == ""
    assert redact_value("use_auth", True) is True
    assert redact_value("api_key", 42) == REDACTED
    assert redact_value("api_key", ["a", "b"]) == REDACTED


@pytest.mark.parametrize("text, secret, expected", [
    ("Authorization: Bearer eyJabc.def", "eyJabc.def", f"Authorization: {REDACTED}"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNz' http://h", "dXNlcjpwYXNz",
     f"curl -H 'Authorization: {REDACTED}' http://h"),
    ("sent bearer tok_123-abc to upstream", "tok_123-abc", f"sent bearer {REDACTED} to upstream"),
    (f"downloading with {HF} now", HF, f"downloading with {REDACTED} now"),
    (f"client key={OPENAI[:6]} full {OPENAI}", OPENAI, None),
    (f"aws id {AWS_ID} used", AWS_ID, f"aws id {REDACTED} used"),
    ("redis://:p4ss@cache:6379/0", "p4ss", f"redis://:{REDACTED}@cache:6379/0"),
    ("GET /v1/models?api_key=abc123&model=gpt2&token=zz9", "abc123",
     f"GET /v1/models?api_key={REDACTED}&model=gpt2&token={REDACTED}"),
    ("url: http://h/?token=inner", "inner", f"url: http://h/?token={REDACTED}"),
    ("{'api_key': 'has spaces in it', 'model': 'gpt2'}", "has spaces",
     f"{{'api_key': '{REDACTED}', 'model': 'gpt2'}}"),
    ('{"password": "hunter2", "n": 1}', "hunter2", f'{{"password": "{REDACTED}", "n": 1}}'),
    ("vllm serve gpt2 --api-key mykey123 --port 8000", "mykey123",
     f"vllm serve gpt2 --api-key {REDACTED} --port 8000"),
    ("OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20abc", "abc", None),
    ("Cookie: session=s1; theme=dark", "s1", f"Cookie: {REDACTED}"),
])
def test_value_patterns(text: str, secret: str, expected: str | None) -> None:
    out = redact_text(text)
    assert secret not in out
    assert REDACTED in out
    if expected is not None:
        assert out == expected
    assert redact_text(out) == out  # idempotent: filters may run twice


@pytest.mark.parametrize("text", [
    "Avg prompt throughput: 10.0 tokens/s, Running: 2 reqs",
    "max_num_batched_tokens=8192 tokenizer=gpt2 max_tokens: 16",
    "Error: engine core died at 12:30:45 (see http://localhost:8000/health)",
    "hf_transfer enabled; key points: none",
    "",
])
def test_innocent_text_is_untouched(text: str) -> None:
    assert redact_text(text) == text


def test_config_objects_are_converted_and_redacted() -> None:
    @dataclasses.dataclass
    class EngineArgs:
        model: str = "gpt2"
        hf_token: str = "plain-token-value"
        max_num_seqs: int = 8

    class Opaque:
        def __str__(self) -> str:
            return f"Opaque(token={HF})"

    ns = argparse.Namespace(model="gpt2", api_key="nskey", extra=Opaque())
    assert redact_mapping(EngineArgs()) == {"model": "gpt2", "hf_token": REDACTED,
                                            "max_num_seqs": 8}
    out = redact_mapping(ns)
    assert out["api_key"] == REDACTED and out["model"] == "gpt2"
    assert HF not in out["extra"] and isinstance(out["extra"], str)


def test_fails_closed_and_survives_cycles() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("boom")

    assert redact_text(Broken()) == REDACTED
    assert redact_mapping({"x": Broken()}) == {"x": REDACTED}
    cyclic: dict = {"a": 1}
    cyclic["self"] = cyclic
    out = redact_mapping(cyclic)  # must terminate
    assert out["a"] == 1


def test_logging_filter_redacts_message_args_and_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test_redact.filter")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("starting with token %s and %r", HF, {"api_key": "dictsecret"})
        log.info("%d%% done, Authorization: Bearer abcdef", 100)
        try:
            raise RuntimeError(f"upstream refused {OPENAI}")
        except RuntimeError:
            log.exception("request failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    for secret in (HF, "dictsecret", "abcdef", OPENAI):
        assert secret not in out, secret
    assert "starting with token" in out and "100% done" in out
    assert "RuntimeError: upstream refused" in out  # traceback kept, only the secret removed
    assert out.count(REDACTED) >= 4


def test_clean_cache_never_holds_a_secret() -> None:
    from vllm_otel import redact
    secret = "Authorization: Bearer abcdefghijklmnop1234"
    for _ in range(3):  # the second and later calls are answered from the clean cache, if at all
        assert "abcdefghijklmnop1234" not in redact_text(secret)
        assert redact_text("10.0.0.7:8000") == "10.0.0.7:8000"
    assert "10.0.0.7:8000" in redact._CLEAN
    assert not any("abcdefghijklmnop1234" in k for k in redact._CLEAN)
