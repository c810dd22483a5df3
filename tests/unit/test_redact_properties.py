"""Redaction as an attacker and a reader see it, with hypothesis: every secret shape is caught
wherever it sits, harmless keys stay readable, and the time is linear in the text.

detect-secrets (Yelp's scanner, the well-kept list of token shapes) is the independent oracle:
whatever its regex plugins find in the input must be gone from our output. It is not used at
run time: redaction runs inside vLLM and must stay linear, and some of its patterns are not
(its JWT and npm patterns rescan from every start)."""

from __future__ import annotations

import string
import time

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from vllm_otel.redact import REDACTED, is_secret_key, redact_mapping, redact_text

detect_plugins = pytest.importorskip("detect_secrets.plugins")
from detect_secrets.plugins.aws import AWSKeyDetector  # noqa: E402
from detect_secrets.plugins.github_token import GitHubTokenDetector  # noqa: E402
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector  # noqa: E402
from detect_secrets.plugins.jwt import JwtTokenDetector  # noqa: E402
from detect_secrets.plugins.private_key import PrivateKeyDetector  # noqa: E402
from detect_secrets.plugins.pypi_token import PypiTokenDetector  # noqa: E402
from detect_secrets.plugins.sendgrid import SendGridDetector  # noqa: E402
from detect_secrets.plugins.slack import SlackDetector  # noqa: E402
from detect_secrets.plugins.stripe import StripeDetector  # noqa: E402

ORACLE = [AWSKeyDetector(), GitHubTokenDetector(), GitLabTokenDetector(), JwtTokenDetector(),
          PypiTokenDetector(), SendGridDetector(), SlackDetector(), StripeDetector()]

ALNUM = string.ascii_letters + string.digits


def _chars(alphabet: str, n: int, m: int | None = None) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=n, max_size=m if m is not None else n)


# Token shapes as their issuers make them (random bodies).
SECRETS = st.one_of(
    _chars(ALNUM, 34).map(lambda b: "hf_" + b),
    _chars(ALNUM, 36).map(lambda b: "ghp_" + b),
    _chars(ALNUM, 36).map(lambda b: "gho_" + b),
    _chars(ALNUM + "_", 60, 82).map(lambda b: "github_pat_" + b),
    _chars(ALNUM + "_-", 20, 40).map(lambda b: "glpat-" + b),
    st.tuples(_chars(string.digits, 10, 13), _chars(string.ascii_lowercase + string.digits, 24))
    .map(lambda t: f"xoxb-{t[0]}-{t[0]}-{t[1]}"),
    _chars(string.ascii_uppercase + string.digits, 16).map(lambda b: "AKIA" + b),
    _chars(ALNUM + "_-", 40, 60).map(lambda b: "sk-proj-" + b),
    _chars(ALNUM + "_-", 80, 100).map(lambda b: "sk-ant-api03-" + b),
    _chars(ALNUM, 24).map(lambda b: "sk_live_" + b),
    _chars(ALNUM + "_-", 35).map(lambda b: "AIza" + b),
    st.tuples(_chars(ALNUM + "_-", 22), _chars(ALNUM + "_-", 43)).map(lambda t: f"SG.{t[0]}.{t[1]}"),
    _chars(ALNUM + "_-", 80).map(lambda b: "pypi-AgEIcHlwaS5vcmc" + b),
    st.tuples(_chars(ALNUM + "_-", 20, 60), _chars(ALNUM + "_-", 20, 60), _chars(ALNUM + "_-", 20, 60))
    .map(lambda t: f"eyJ{t[0]}.eyJ{t[1]}.{t[2]}"),
)
# What surrounds a secret in a log line, a label or an argument.
CONTEXT = st.text(alphabet=" \t\n:=,;\"'()[]{}<>/@?&abcXYZ019._-", max_size=40)
SEPARATOR = st.sampled_from([" ", "\n", "\t", "\"", "'", "=", ": ", ",", "(", "[", "{", "/", "?x=", "<"])

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@PROPS
@given(secret=SECRETS, before=CONTEXT, after=CONTEXT, sep1=SEPARATOR, sep2=SEPARATOR)
def test_every_token_shape_is_caught_wherever_it_sits(secret, before, after, sep1, sep2):  # noqa: ANN001
    text = f"{before}{sep1}{secret}{sep2.strip('=?x') or ' '}{after}"
    out = redact_text(text)
    assert secret not in out
    assert REDACTED in out
    assert redact_text(out) == out  # idempotent


@PROPS
@given(secret=SECRETS, before=CONTEXT, after=CONTEXT)
def test_what_detect_secrets_finds_is_gone(secret, before, after):  # noqa: ANN001
    text = f"{before} {secret} {after}"
    found = {s for p in ORACLE for s in p.analyze_line(filename="x", line=text)}
    assume(found)
    out = redact_text(text)
    for s in found:
        assert s.secret_value not in out, (type(s).__name__, s.secret_value)


PEM_KINDS = ["RSA ", "EC ", "DSA ", "OPENSSH ", "ENCRYPTED ", ""]


@PROPS
@given(kind=st.sampled_from(PEM_KINDS), body=st.lists(_chars(ALNUM + "+/", 64), min_size=1, max_size=6),
       escaped=st.booleans(), truncated=st.booleans(), before=CONTEXT)
def test_pem_private_keys_are_removed_whole(kind, body, escaped, truncated, before):  # noqa: ANN001
    nl = "\\n" if escaped else "\n"  # in a JSON string or a one-line log, newlines are escaped
    pem = f"-----BEGIN {kind}PRIVATE KEY-----{nl}" + nl.join(body)
    if not truncated:
        pem += f"{nl}-----END {kind}PRIVATE KEY-----"
    text = f"{before} key file: {pem} done" if not truncated else f"{before} {pem}"
    if kind != "ENCRYPTED ":  # PKCS#8 encrypted keys: we catch them, detect-secrets does not
        assert any(PrivateKeyDetector().analyze_line(filename="x", line=text))
    out = redact_text(text)
    for line in body:
        assert line not in out
    assert "PRIVATE KEY" not in out.replace(REDACTED, "")
    if not truncated:
        assert out.endswith(" done")  # what follows a complete key stays


HARMLESS_KEYS = ["monkey", "cache_key", "turkey", "hotkey", "primary_key", "sort_key", "kv_cache_key",
                 "partition_key", "eos_token", "pad_token_id", "bos_token", "max_tokens", "tokenizer",
                 "keyboard_layout", "public_key", "prefix_cache_key", "max_num_batched_tokens"]
SECRET_KEYS = ["HF_TOKEN", "OPENAI_KEY", "api_key", "apiKey", "access_key", "AWS_SECRET_ACCESS_KEY",
               "key", "private_key", "ssh_key", "client_secret", "x-api-key", "ANTHROPIC_API_KEY",
               "GITHUB_TOKEN", "signing_key", "Authorization", "db_password", "session_token"]


@pytest.mark.parametrize("key", HARMLESS_KEYS)
def test_harmless_keys_stay_readable(key: str) -> None:
    assert not is_secret_key(key)
    assert redact_mapping({key: "value-1"}) == {key: "value-1"}
    assert redact_text(f"{key}=value-1") == f"{key}=value-1"


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_caught(key: str) -> None:
    assert is_secret_key(key)
    assert redact_mapping({key: "value-1"}) == {key: REDACTED}


@PROPS
@given(st.text(max_size=300))
def test_any_text_redacts_idempotently(text):  # noqa: ANN001
    once = redact_text(text)
    assert redact_text(once) == once


# Pieces that made the old patterns rescan from every start (a.a.a..., eyJ-eyJ-..., a=a=a=...).
PIECES = ["a", "A", "0", ".", "-", "_", "=", ":", "/", "@", "eyJ", "sk-", "hf_", "ghp_", "xoxb-", "://",
          "token", "key", "Bearer ", "authorization", "--api-key", "\"", "'", "AKIA", "-----BEGIN "]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=4))
@example(pieces=["=", "eyJ"])  # JWT padding inside a segment made every "eyJ" rescan the rest
def test_time_is_linear_in_adversarial_text(pieces):  # noqa: ANN001
    unit = "".join(pieces)
    text = (unit * (60_000 // len(unit) + 1))[:60_000]
    t0 = time.perf_counter()
    redact_text(text)
    dt = time.perf_counter() - t0
    # Linear: ~0.03 s here for 60,000 characters. The quadratic patterns took over 5 s for
    # 16,000 characters of "a" (and 0.8 s for 8,000 of a token-like string).
    assert dt < 0.5, (unit, dt)
