"""vLLM's argument list as data: read, patch and redact flags (never through a shell).

``patch_args`` replaces, adds or removes flags in every spelling argparse accepts
(``--flag value``, ``--flag=value``, ``--no-flag``, short aliases), so a restart changes exactly
what it was asked to and nothing else."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from vllm_otel.redact import REDACTED, is_secret_key, redact_text

__all__ = ["normalize_flag", "get_arg", "has_flag", "patch_args", "redact_argv", "health_url_for",
           "BOOLEAN_FLAGS", "ALIASES"]


# vLLM's parser accepts --a_b for --a-b and --flag=value for --flag value: one flag here. A token
# after a flag is its value unless it starts with "-" (and is not a negative number) or the flag
# is an on/off flag (BOOLEAN_FLAGS, or set to True): so "--enforce-eager MODEL" keeps its model.
# Tokens after a bare "--" are never touched.

# vLLM's on/off flags that may be patched; their next token is never taken as a value.
BOOLEAN_FLAGS = frozenset({
    "--enforce-eager", "--disable-custom-all-reduce", "--enable-sleep-mode", "--trust-remote-code",
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
    "--no-enable-chunked-prefill", "--disable-log-stats", "--disable-uvicorn-access-log",
    "--enable-log-requests", "--enable-expert-parallel", "--disable-log-requests",
})
# Short spellings vLLM accepts.
ALIASES = {"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size",
           "-dp": "--data-parallel-size"}

_NUMBER = re.compile(r"^-\d")


def normalize_flag(flag: str) -> str:
    """``--gpu_memory_utilization`` -> ``--gpu-memory-utilization``; ``-tp`` -> its long form."""
    if flag in ALIASES:
        return ALIASES[flag]
    if not flag.startswith("--") or len(flag) < 3:
        raise ValueError(f"not a long option: {flag!r}")
    return "--" + flag[2:].replace("_", "-")


def _token_flag(tok: str) -> tuple[str | None, str | None]:
    """(normalized flag, inline value) of a token, or (None, None) for a value / positional."""
    if tok in ALIASES:
        return ALIASES[tok], None
    if not tok.startswith("--") or tok == "--":
        return None, None
    name, eq, value = tok.partition("=")
    return normalize_flag(name), (value if eq else None)


def _is_value(tok: str) -> bool:
    return not tok.startswith("-") or bool(_NUMBER.match(tok))


def _spans(argv: Sequence[str], boolean: Iterable[str] = ()) -> list[tuple[int, int, str | None, str | None]]:
    """(start, end, flag, value) for every token group before a bare ``--``."""
    bools = BOOLEAN_FLAGS | {normalize_flag(b) for b in boolean}
    out = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            break
        flag, inline = _token_flag(tok)
        if flag is None:
            out.append((i, i + 1, None, None))
            i += 1
            continue
        if inline is not None:
            out.append((i, i + 1, flag, inline))
            i += 1
        elif flag not in bools and i + 1 < len(argv) and argv[i + 1] != "--" and _is_value(argv[i + 1]):
            out.append((i, i + 2, flag, argv[i + 1]))
            i += 2
        else:
            out.append((i, i + 1, flag, None))
            i += 1
    return out


def get_arg(argv: Sequence[str], flag: str) -> str | bool | None:
    """The value of ``flag`` (the last one wins, as in argparse); True for a bare flag; None if absent."""
    want = normalize_flag(flag)
    found: str | bool | None = None
    for _, _, f, v in _spans(argv):
        if f == want:
            found = True if v is None else v
    return found


def has_flag(argv: Sequence[str], flag: str) -> bool:
    return get_arg(argv, flag) is not None


def _render(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def patch_args(argv: Sequence[str], set_args: Mapping[str, Any] | None = None,
               remove_args: Iterable[str] = ()) -> list[str]:
    """A new argument list: ``argv`` with flags set and removed. ``argv`` is not modified.

    ``set_args`` maps a flag to: ``True`` (a bare on/off flag, present once; its ``--no-``
    twin removed), ``False`` or ``None`` (removed, with its ``--no-`` twin: vLLM's default
    applies), anything else (``--flag value``: the first occurrence is replaced in place, later
    ones dropped, appended when absent). ``remove_args`` drops every occurrence of each flag with
    its value. Raises ValueError for a flag that is not a long option.
    """
    set_args = {normalize_flag(k): v for k, v in (set_args or {}).items()}
    remove = {normalize_flag(f) for f in remove_args}
    for f in list(remove):
        remove.add(_twin(f))
    for f, v in set_args.items():
        if v is True or v is False or v is None:
            remove.add(_twin(f))
        if v is False or v is None:
            remove.add(f)
    boolean = [f for f, v in set_args.items() if v is True]
    argv = list(argv)
    tail_at = argv.index("--") if "--" in argv else len(argv)
    out: list[str] = []
    done: set[str] = set()
    for start, end, flag, _ in _spans(argv, boolean):
        if flag is None:
            out.extend(argv[start:end])
            continue
        if flag in remove:
            continue
        if flag in set_args:
            if flag in done:
                continue
            done.add(flag)
            v = set_args[flag]
            out.extend([flag] if v is True else [flag, _render(v)])
            continue
        out.extend(argv[start:end])
    for flag, v in set_args.items():
        if flag not in done and v is not False and v is not None:
            out.extend([flag] if v is True else [flag, _render(v)])
    return out + argv[tail_at:]


def _twin(flag: str) -> str:
    """``--enforce-eager`` <-> ``--no-enforce-eager`` (argparse's BooleanOptionalAction)."""
    return "--" + flag[5:] if flag.startswith("--no-") else "--no-" + flag[2:]


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv for display: values of secret-named flags (``--api-key``) and secret shapes hidden."""
    out = list(argv)
    for start, end, flag, value in _spans(argv):
        if flag is not None and value is not None and is_secret_key(flag.lstrip("-")):
            out[end - 1] = (out[end - 1].split("=", 1)[0] + "=" + REDACTED) if end - start == 1 else REDACTED
    return [redact_text(t) for t in out]


def health_url_for(argv: Sequence[str], path: str = "/health") -> str:
    """Where vLLM started with ``argv`` answers: its ``--host`` (loopback for a wildcard) and ``--port``."""
    port = get_arg(argv, "--port")
    host = get_arg(argv, "--host")
    if not isinstance(host, str) or host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port if isinstance(port, str) else 8000}{path}"
