"""Secret redaction for everything we store or export from inside vLLM processes.

Environment snapshots, engine arguments, reasons and log lines end up in checkpoints, span
attributes and JSON dumps that leave the machine; a leaked ``HF_TOKEN`` there is a real incident
(the reference system this project replaces logged the whole environment). Two complementary rules:

* by key name: the value of ``HF_TOKEN`` is secret whatever it looks like;
* by value shape: a ``Bearer`` token or ``hf_...`` inside an otherwise innocent string.

Every function fails closed: if redaction itself breaks, the value becomes ``REDACTED`` rather
than passing through. Only the standard library is imported, so this is safe inside vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import logging
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "is_secret_key",
    "redact_mapping",
    "redact_text",
    "redact_value",
]

REDACTED = "***REDACTED***"

# Deep engine configs (vLLM's nested dataclasses) must not make a snapshot unbounded or recursive.
_MAX_DEPTH = 8

# Matched anywhere in the squashed key: these words have no innocent meaning in a config key.
_ALWAYS_SECRET = ("secret", "password", "passwd", "passphrase", "credential", "cookie",
                  "private", "signature", "apikey")
# Matched per word only: as substrings they would hide max_num_batched_tokens, tokenizer...
_TOKEN_WORD = re.compile(r"[a-z]*token")  # token, hftoken, accesstoken; never tokens/tokenizer
# "key" as a word of its own, or glued to a word that makes it a credential (accesskey); never
# monkey, turkey, hotkey.
_KEY_WORD = re.compile(r"(?:api|access|secret|private|auth|ssh|signing|master|encryption|client"
                       r"|account|license|service|admin|deploy|hmac|app)?keys?")
# A key or token named by what it indexes or marks, not by what it unlocks: cache_key,
# primary_key, eos_token. Only the word right before decides (OPENAI_KEY stays secret).
_HARMLESS_BEFORE_KEY = frozenset({
    "cache", "sort", "primary", "foreign", "partition", "routing", "group", "dedupe", "lookup",
    "hash", "dict", "map", "index", "shard", "composite", "unique", "row", "cluster", "join",
    "public", "idempotency", "label", "metric", "prefix", "kv", "sharding", "hot", "short", "cut"})
_HARMLESS_BEFORE_TOKEN = frozenset({
    "eos", "bos", "pad", "unk", "sep", "cls", "mask", "special", "stop", "start", "end", "image",
    "audio", "video", "decoder", "first", "last", "next", "max", "min", "num", "per"})
_AUTH_WORD = re.compile(r"o?auth(?:n|z|orization|token|key|header)?")  # never author
_SESSION_WORD = re.compile(r"session[a-z]*")
_DSN_WORD = re.compile(r"[a-z]*dsn")
_EXACT_WORDS = frozenset({"pwd", "pass"})
# OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer ..." is a string of secrets; a headers *dict*
# is recursed into instead, so Content-Type survives while Authorization is caught by name.
_HEADERS_WORD = re.compile(r"headers?")

_CAMEL_1 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL_2 = re.compile(r"([a-z0-9])([A-Z])")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _words(key: str) -> list[str]:
    key = _CAMEL_2.sub(r"\1_\2", _CAMEL_1.sub(r"\1_\2", key[:256]))
    return [w for w in _NON_ALNUM.split(key.lower()) if w]


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """True when a key (env var, argument, header, dict key) names a secret."""
    words = _words(key)
    squashed = "".join(words)
    if any(w in squashed for w in _ALWAYS_SECRET):
        return True
    for i, w in enumerate(words):
        before = words[i - 1] if i else ""
        if w in _EXACT_WORDS or _AUTH_WORD.fullmatch(w) or _SESSION_WORD.fullmatch(w) \
                or _DSN_WORD.fullmatch(w):
            return True
        if _TOKEN_WORD.fullmatch(w) and not (w == "token" and before in _HARMLESS_BEFORE_TOKEN):
            return True
        if _KEY_WORD.fullmatch(w) and not (w in ("key", "keys") and before in _HARMLESS_BEFORE_KEY):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def _is_headers_key(key: str) -> bool:
    return any(_HEADERS_WORD.fullmatch(w) for w in _words(key))


# --- value shapes ---------------------------------------------------------------------------------
# Every pattern runs in time linear in the text, whatever the text: an Alertmanager label or a log
# line is attacker-controlled, and a pattern that may start anywhere inside a long run of
# token characters (``\b`` does not stop that: "a.a.a..." is all word starts) rescans the run from
# each start, quadratically (8,000 characters took 0.8 s). So each pattern may only start where
# the run of its own characters starts (the negative look-behinds), and then scans the run once.
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----.*?"
    r"(?:-----END[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----|\Z)"
    r"|PuTTY-User-Key-File-\d.*?(?:Private-MAC:\s*[0-9a-fA-F]+|\Z)", re.DOTALL)
# Authorization is "scheme credentials" or bare credentials; cookies run on to the end of the
# line ("a=1; b=2"). Quotes and commas (the OTLP headers list separator) end both.
_HEADER = re.compile(
    r"""(?i)(?<![a-z0-9_-])((?:proxy-)?authorization)(\s*[:=]\s*)((?:[A-Za-z]+[ \t]+)?[^\s,'"]+)"""
    r"""|(?<![a-z0-9_-])(set-cookie|cookie)(\s*[:=]\s*)([^\r\n,'"]+)""")
_BEARER = re.compile(r"(?i)(?<![a-z0-9_-])(bearer)(\s+|%20)([A-Za-z0-9\-._~+/]+=*)")
_URL_CREDENTIALS = re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]*://[^/\s:@]*:)([^@\s/]+)@")
# One look-behind for every shape: inside a run of token characters (most of any long text) the
# pattern fails at once instead of trying each shape.
_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_\-])(?:"
    r"hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|sk-[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic (sk-ant-) and compatible
    r"|(?:AKIA|ASIA|A3T[A-Z0-9]|ABIA|ACCA)[0-9A-Z]{16}(?![0-9A-Z])"  # AWS key ids
    r"|gh[pousr]_[A-Za-z0-9_]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|(?:glpat|gldt|glft|glsoat|glrt|glcbt|glimt|glptt|glagent|gloas)-[A-Za-z0-9_\-]{20,}"
    r"|GR1348941[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|hooks\.slack\.com/services/[A-Za-z0-9_/]+"  # Slack webhook URLs
    # JWT; padding only at a segment's end, so "=eyJ=eyJ..." cannot make every start rescan the rest
    r"|eyJ[A-Za-z0-9_\-]{8,}=*\.[A-Za-z0-9_\-]{2,}=*(?:\.[A-Za-z0-9_\-+/]*=*)?"
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API keys
    r"|[rs]k_(?:live|test)_[0-9a-zA-Z]{16,}"  # Stripe
    r"|SG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"  # SendGrid
    r"|pypi-AgE[A-Za-z0-9_\-]{50,}"  # PyPI
    r"|npm_[A-Za-z0-9]{36}"  # npm
    r"|SK[0-9a-f]{32}(?![0-9a-f])"  # Twilio API keys
    r"|[0-9]{8,10}:AA[0-9A-Za-z_\-]{33}"  # Telegram bot tokens
    r"|[MNO][A-Za-z0-9_\-]{23,25}\.[A-Za-z0-9_\-]{6}\.[A-Za-z0-9_\-]{27,}"  # Discord
    r")")
# name=value, name: value, "name": "value", ?name=value&... ; the name decides (is_secret_key).
# Name and value are two patterns: the value is only looked at after a secret name, so a long
# value after an innocent name ("a=a=a=...") is not rescanned from every "=".
_ASSIGNMENT = re.compile(
    r"""(?<![A-Za-z0-9_.\-])(?P<name>[A-Za-z0-9_.\-]+)(?P<q1>["']?)(?P<sep>\s*[=:]\s*)""")
_ASSIGNED_VALUE = re.compile(
    r"""(?P<q2>["'])(?P<qvalue>[^"'\r\n]*)(?P=q2)|(?P<value>[^\s"'&,;#)}\]]+)""")
# Command lines as text: --api-key VALUE, --hf-token VALUE.
_CLI_FLAG = re.compile(r"(?P<flag>(?<![\w-])--?(?P<name>[A-Za-z][A-Za-z0-9_\-]*))(?P<sep>\s+)"
                       r"(?P<value>[^\s\-][^\s]*)")


def _header_repl(m: re.Match[str]) -> str:
    if m.group(1):
        return f"{m.group(1)}{m.group(2)}{REDACTED}"
    return f"{m.group(4)}{m.group(5)}{REDACTED}"


def _assignment_repl(m: re.Match[str]) -> tuple[str, int] | None:
    name = m.group("name")
    if not (is_secret_key(name) or _is_headers_key(name)):
        return None
    v = _ASSIGNED_VALUE.match(m.string, m.end())
    if v is None:
        return None
    head = f"{name}{m.group('q1')}{m.group('sep')}"
    if v.group("q2"):
        if v.group("qvalue") in ("", REDACTED):
            return m.group(0) + v.group(0), v.end()
        q = v.group("q2")
        return f"{head}{q}{REDACTED}{q}", v.end()
    if v.group("value") == REDACTED:
        return m.group(0) + v.group(0), v.end()
    return f"{head}{REDACTED}", v.end()


def _cli_repl(m: re.Match[str]) -> tuple[str, int] | None:
    if not is_secret_key(m.group("name")):
        return None
    if m.group("value") == REDACTED:
        return m.group(0), m.end()
    return f"{m.group('flag')}{m.group('sep')}{REDACTED}", m.end()


def _sub_named(pattern: re.Pattern[str], text: str, repl: Any) -> str:
    """Like ``pattern.sub`` but a non-secret match only consumes its name and separator.

    Otherwise ``url: http://h/?token=abc`` would swallow the inner ``token=abc`` unexamined.
    ``repl`` answers None (not a secret) or the replacement and where it ends.
    """
    out: list[str] = []
    pos = 0
    while True:
        m = pattern.search(text, pos)
        if m is None:
            break
        got = repl(m)
        if got is None:
            out.append(text[pos:m.end("sep")])
            pos = m.end("sep")
        else:
            replacement, end = got
            out.append(text[pos:m.start()])
            out.append(replacement)
            pos = end
    out.append(text[pos:])
    return "".join(out)


def redact_text(s: Any) -> str:
    """Redact secret-shaped substrings of ``s`` (converted with ``str`` when not a string).

    Idempotent, so filters applied at both logger and handler level do no harm.
    """
    try:
        text = s if isinstance(s, str) else str(s)
        if not text:
            return text
        if text in _CLEAN:
            return text
        out = _redact_text(text)
        if out == text and len(text) <= _CLEAN_MAX_LEN:
            if len(_CLEAN) >= _CLEAN_MAX:
                _CLEAN.clear()
            _CLEAN[text] = None
        return out
    except Exception:  # noqa: BLE001 - fail closed
        return REDACTED


# Alert labels, annotations and metric attributes repeat the same short strings all day long
# (instance, alertname, severity, model): six regex passes each time were ~15 % of the receiver's
# write path. Short strings found clean are remembered (only clean ones: a secret is never kept
# in the cache); a bounded dict, emptied when full.
_CLEAN: dict[str, None] = {}
_CLEAN_MAX, _CLEAN_MAX_LEN = 8192, 256


def _redact_text(text: str) -> str:
    # Only called from redact_text, whose try fails closed. A pattern runs only when the text
    # holds the literal it needs (a substring test is ~50x cheaper than a regex scan).
    if "PRIVATE KEY" in text or "PuTTY-User-Key-File" in text:
        text = _PEM_PRIVATE_KEY.sub(REDACTED, text)
    lower = text.lower()
    if "authorization" in lower or "cookie" in lower:
        text = _HEADER.sub(_header_repl, text)
    if "bearer" in lower:
        text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    if "://" in text and "@" in text:
        text = _URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    # A name is only secret (is_secret_key) when it holds one of these words; without any, the
    # name=value and --flag value passes (a Python step per match) have nothing to find.
    if not any(w in lower for w in _NAME_TRIGGERS):
        return text
    if "=" in text or ":" in text:
        text = _sub_named(_ASSIGNMENT, text, _assignment_repl)
    if "-" in text:
        text = _sub_named(_CLI_FLAG, text, _cli_repl)
    return text


_NAME_TRIGGERS = ("secret", "pass", "pwd", "credential", "cookie", "private", "signature", "key",
                  "token", "auth", "session", "dsn", "header")


def _plain_fields(obj: Any) -> dict[str, Any] | None:
    """Shallow field view of config-like objects (argparse results, vLLM EngineArgs dataclasses)."""
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
    return None


def _redact_sequence(items: Any, key: str | None, depth: int) -> list[Any]:
    out: list[Any] = []
    secret_next = False  # argv form: ["--api-key", "VALUE"]
    for item in items:
        if secret_next and isinstance(item, str) and not item.startswith("-"):
            out.append(REDACTED)
            secret_next = False
            continue
        secret_next = (isinstance(item, str) and item.startswith("-") and "=" not in item
                       and is_secret_key(item.lstrip("-")))
        out.append(_redact(key, item, depth + 1))
    return out


def _redact(key: str | None, value: Any, depth: int) -> Any:
    try:
        if key is not None and is_secret_key(key):
            # None/""/bools cannot carry a secret, and "unset" is worth seeing.
            if value is None or value == "" or isinstance(value, bool):
                return value
            return REDACTED
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            if key is not None and _is_headers_key(key):
                return REDACTED
            return redact_text(value)
        if isinstance(value, enum.Enum):
            return _redact(key, value.value, depth)
        if depth >= _MAX_DEPTH:
            return redact_text(repr(value)[:1024])
        if isinstance(value, bytes):
            return redact_text(value.decode("utf-8", "replace"))
        if isinstance(value, Mapping):
            return {str(k): _redact(str(k), v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return _redact_sequence(value, key, depth)
        fields = _plain_fields(value)
        if fields is not None:
            return {k: _redact(k, v, depth + 1) for k, v in fields.items()}
        # Unknown objects become text so nothing downstream can leak them through repr/default=str.
        return redact_text(str(value))
    except Exception:  # noqa: BLE001 - fail closed
        return REDACTED


def redact_value(key: str | None, value: Any) -> Any:
    """Redacted, JSON-friendly copy of ``value`` as found under ``key`` (``None``: no key).

    Mappings become dicts with str keys, sequences lists, dataclasses and argparse namespaces dicts
    of their fields, unknown objects redacted text; numbers, bools and None pass through.
    """
    return _redact(None if key is None else str(key), value, 0)


def redact_mapping(d: Any) -> dict[str, Any]:
    """Redacted copy of a mapping (or dataclass / argparse namespace), nested values included."""
    try:
        if d is None:
            return {}
        if not isinstance(d, Mapping):
            fields = _plain_fields(d)
            if fields is None:
                return {"value": redact_value(None, d)}
            d = fields
        return {str(k): _redact(str(k), v, 1) for k, v in d.items()}
    except Exception:  # noqa: BLE001 - fail closed
        return {"value": REDACTED}


class RedactingFilter(logging.Filter):
    """Logging filter that redacts the formatted message, exception text and stack of each record.

    Attach it to *handlers*: a filter on a logger does not see records propagated from children.
    The message is formatted here (args folded in) because an argument's ``repr`` may hold a secret.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is logging's problem, not ours
                message = f"{record.msg} {record.args!r}"
            record.msg = redact_text(message)
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact_text(record.exc_text)
            if record.stack_info:
                record.stack_info = redact_text(record.stack_info)
        except Exception:  # noqa: BLE001 - never drop or break a log line
            record.msg, record.args = REDACTED, None
        return True
