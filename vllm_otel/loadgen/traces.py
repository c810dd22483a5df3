"""Load real LLM request traces and turn their records into prompts of exact length.

Two public formats are understood (see ``vllm_otel/loadgen/data/PROVENANCE.md``):

* Azure LLM inference trace 2023 (CSV, header ``TIMESTAMP,ContextTokens,GeneratedTokens``, absolute
  wall-clock timestamps with 7 fractional digits; plain seconds are accepted too).
* Mooncake FAST'25 traces (JSONL, ``timestamp`` in ms since the trace start, ``input_length``,
  ``output_length`` and ``hash_ids``: one id per 512-token prompt block, equal ids = shared prefix).

Prompts are synthesised rather than taken from anywhere: the traces only publish lengths (and, for
Mooncake, prefix structure), which is exactly what load on a server depends on.

The package ships the four public traces xz-compressed (:data:`SHIPPED_DIR`); a path that does not
exist is looked up there by its file name, and ``.xz`` / ``.gz`` files are read as they are.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import lzma
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

__all__ = [
    "TraceRequest", "TraceError", "load_trace", "detect_format", "prompt_token_ids", "prompt_text",
    "BLOCK_TOKENS", "MIN_TOKEN_ID", "DEFAULT_VOCAB_SIZE", "SHIPPED_DIR", "SHIPPED_TRACES",
    "resolve_trace", "default_traces_dir",
]

TraceFormat = Literal["azure", "mooncake"]

BLOCK_TOKENS = 512  # Mooncake's hash_ids each cover one 512-token block.
MIN_TOKEN_ID = 8  # Below this are special tokens (<unk>, <s>, </s>, role markers) in tiny models.
DEFAULT_VOCAB_SIZE = 500  # Fits the 512-entry tiny test model; real models have far more ids.

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

# The traces shipped with the package (data only; licences and sources in PROVENANCE.md there).
SHIPPED_DIR = Path(__file__).resolve().parent / "data"
SHIPPED_TRACES = ("AzureLLMInferenceTrace_conv.csv", "AzureLLMInferenceTrace_code.csv",
                  "mooncake_conversation_trace.jsonl", "mooncake_synthetic_trace.jsonl")
_COMPRESSED = (".xz", ".gz")


def default_traces_dir() -> Path:
    """``$VLLM_OTEL_TRACES_DIR`` when set (your own traces), else the shipped ones."""
    env = os.environ.get("VLLM_OTEL_TRACES_DIR")
    return Path(env) if env else SHIPPED_DIR


def resolve_trace(path: str | Path) -> Path:
    """The file to read for ``path``: itself when it exists, else its compressed copy beside it,
    else the shipped trace of that file name. A name found nowhere is returned unchanged (the
    caller's read then names it in its error)."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (p.with_name(p.name + ext) for ext in _COMPRESSED):
        if cand.exists():
            return cand
    base = SHIPPED_DIR / _plain_name(p)
    for cand in (base, *(base.with_name(base.name + ext) for ext in _COMPRESSED)):
        if cand.exists():
            return cand
    return p


def _plain_name(p: Path) -> str:
    """The file name without a compression suffix (``x.csv.xz`` -> ``x.csv``)."""
    return p.name[: -len(p.suffix)] if p.suffix.lower() in _COMPRESSED else p.name


def _open_text(p: Path) -> io.TextIOBase:
    suffix = p.suffix.lower()
    if suffix == ".xz":
        return lzma.open(p, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    if suffix == ".gz":
        return gzip.open(p, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    return p.open(encoding="utf-8", newline="")


class TraceError(ValueError):
    """A trace file could not be read; the message names the file and, where known, the line."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives (seconds after the first one) and its size."""

    offset_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------------------
# Loading


def detect_format(path: str | Path) -> TraceFormat:
    """``.csv`` is Azure, ``.jsonl``/``.json`` Mooncake; anything else is sniffed from content."""
    p = resolve_trace(path)
    suffix = Path(_plain_name(p)).suffix.lower()
    if suffix == ".csv":
        return "azure"
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    try:
        with _open_text(p) as fh:
            first = next((line.strip() for line in fh if line.strip()), "")
    except OSError as exc:
        raise TraceError(f"{p}: cannot read trace: {exc.strerror or exc}") from exc
    if not first:
        raise TraceError(f"{p}: trace file is empty")
    return "mooncake" if first.startswith("{") else "azure"


def load_trace(path: str | Path, *, limit: int | None = None, start: int = 0) -> list[TraceRequest]:
    """Read a trace, sort it by arrival, keep ``[start, start + limit)`` and rebase offsets to 0.

    Rebasing after slicing means ``start=1000`` replays request 1000 immediately instead of idling
    for however long the trace took to get there.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    p = resolve_trace(path)
    fmt = detect_format(p)
    try:
        with _open_text(p) as fh:
            rows = list(_read_azure(p, fh) if fmt == "azure" else _read_mooncake(p, fh))
    except OSError as exc:
        raise TraceError(f"{p}: cannot read trace: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{p}: not a UTF-8 text file ({exc.reason})") from exc
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as exc:
        raise TraceError(f"{p}: corrupt compressed trace ({exc})") from exc
    if not rows:
        raise TraceError(f"{p}: trace file has no requests")

    # Stable sort: requests with equal timestamps (common in Mooncake) keep their file order.
    rows.sort(key=lambda r: r[0])
    end = None if limit is None else start + limit
    selected = rows[start:end]
    if not selected:
        return []
    t0 = selected[0][0]
    return [TraceRequest(offset_s=t - t0, input_tokens=i, output_tokens=o, hash_ids=h)
            for t, i, o, h in selected]


_Row = tuple[float, int, int, tuple[int, ...]]


def _read_azure(path: Path, fh: Any) -> Iterator[_Row]:
    reader = csv.reader(fh)
    header: list[str] | None = None
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if header is None:
            header = [f.strip() for f in fields]
            missing = [c for c in _AZURE_COLUMNS if c.lower() not in {h.lower() for h in header}]
            if missing:
                raise TraceError(f"{path}:{line}: bad CSV header {','.join(header)!r}; expected "
                                 f"{','.join(_AZURE_COLUMNS)} (missing {', '.join(missing)})")
            index = {h.lower(): n for n, h in enumerate(header)}
            cols = [index[c.lower()] for c in _AZURE_COLUMNS]
            continue
        if len(fields) != len(header):
            raise TraceError(f"{path}:{line}: expected {len(header)} fields, got {len(fields)}")
        ts, ctx, gen = (fields[c].strip() for c in cols)
        yield (_parse_timestamp(path, line, ts), _parse_length(path, line, "ContextTokens", ctx),
               _parse_length(path, line, "GeneratedTokens", gen), ())
    if header is None:
        raise TraceError(f"{path}: trace file is empty")


def _parse_timestamp(path: Path, line: int, value: str) -> float:
    """Azure timestamps are wall-clock datetimes; plain numbers (seconds) are accepted as well.

    Python 3.11's ``fromisoformat`` takes the 7-digit fractions of the Azure files (it keeps
    microseconds); anything it rejects gets a message naming the offending text.
    """
    try:
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise TraceError(f"{path}:{line}: TIMESTAMP {value!r} is neither a date-time "
                         f"(YYYY-MM-DD HH:MM:SS[.fff]) nor a number of seconds") from None
    # Naive times are read as UTC: only differences matter, and local time would bend them at DST.
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _parse_length(path: Path, line: int, field: str, value: Any) -> int:
    # JSON true/false are ints to Python; a boolean length is a malformed record, not 0 or 1.
    if isinstance(value, bool):
        raise TraceError(f"{path}:{line}: {field} must be a whole number, got {value!r}")
    try:
        number = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        number = None
    if number is None:
        raise TraceError(f"{path}:{line}: {field} must be a whole number, got {value!r}")
    if number < 0:
        raise TraceError(f"{path}:{line}: {field} must be >= 0, got {number}")
    return number


def _read_mooncake(path: Path, fh: Any) -> Iterator[_Row]:
    seen = False
    for line, text in enumerate(fh, start=1):
        if not text.strip():
            continue
        seen = True
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{line}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise TraceError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in record]
        if missing:
            raise TraceError(f"{path}:{line}: missing field(s) {', '.join(missing)}")
        ts = record["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise TraceError(f"{path}:{line}: timestamp must be a number of ms, got {ts!r}")
        hash_ids = record.get("hash_ids", [])
        if not isinstance(hash_ids, list) or any(
                isinstance(h, bool) or not isinstance(h, int) for h in hash_ids):
            raise TraceError(f"{path}:{line}: hash_ids must be a list of integers")
        yield (ts / 1000.0, _parse_length(path, line, "input_length", record["input_length"]),
               _parse_length(path, line, "output_length", record["output_length"]),
               tuple(hash_ids))
    if not seen:
        raise TraceError(f"{path}: trace file is empty")


# ----------------------------------------------------------------------------------------------
# Prompt synthesis


@lru_cache(maxsize=8192)  # ~16 MB: numpy blocks, not tuples of Python ints (~10x larger)
def _block(key: str, vocab_size: int) -> np.ndarray:
    """512 token ids determined only by ``key``: the same key always yields the same block.

    SHAKE-256 output is fixed by the standard, so prompts (and which of them share prefix-cache
    blocks) are identical across runs, machines and library versions; it is also far faster than
    drawing 512 numbers from ``random.Random``, which matters when a sped-up Mooncake replay needs
    millions of prompt tokens per second. Ids stay below 65536 + 8 even for larger vocabularies,
    which is harmless, and the modulo bias is irrelevant for synthetic prompts.
    """
    digest = hashlib.shake_256(key.encode()).digest(2 * BLOCK_TOKENS)
    ids = np.frombuffer(digest, dtype="<u2").astype(np.uint32)
    ids = ids % (vocab_size - MIN_TOKEN_ID) + MIN_TOKEN_ID
    ids.flags.writeable = False  # shared by every prompt using this block
    return ids


def prompt_token_ids(request: TraceRequest, *, length: int | None = None, salt: int = 0,
                     vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[int]:
    """Exactly ``length`` (default ``request.input_tokens``) token ids for ``request``.

    Mooncake requests are built block by block from their hash ids, so two requests that share
    leading hash ids share those leading 512-token blocks and hit the server's prefix cache exactly
    as in production. Requests without hash ids (Azure), or tokens beyond the listed blocks, come
    from blocks keyed by ``salt`` (pass the request's index) so they share nothing with anyone.
    Shorter lengths (clipping) cut from the end, which keeps the shared prefix intact.
    """
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {MIN_TOKEN_ID}, got {vocab_size}")
    n = request.input_tokens if length is None else length
    blocks = [_block(f"h{h}", vocab_size) for h in request.hash_ids[:math.ceil(n / BLOCK_TOKENS)]]
    for extra in range(math.ceil(n / BLOCK_TOKENS) - len(blocks)):
        blocks.append(_block(f"r{salt}.{extra}", vocab_size))
    if not blocks:
        return []
    return np.concatenate(blocks)[:n].tolist()


# Short, common English words: most tokenizers encode " word" as one token, so N words is roughly
# N tokens. A few hundred of them keep different id blocks mapping to visibly different text.
_WORDS = tuple(
    "the of and to in is was for on are with as at be by this have from or one had not but what "
    "all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much before go "
    "good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things help "
    "put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end "
    "along while might next sound below saw something thought both few those always looked show "
    "large often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head above "
    "kind began almost live page got earth need far hand high year mother light parts country "
    "father let night following picture being study second eyes soon times story boys since white "
    "days ever paper hard near sentence better best across during today others however sure means "
    "knew try told young miles sun ways thing whole hear example heard several change answer room "
    "sea against top turned learn point city play toward five using himself usually".split()
)


def prompt_text(request: TraceRequest, *, length: int | None = None, salt: int = 0,
                vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """A word string of roughly ``length`` tokens for servers that only take text prompts.

    It is the token-id prompt with each id mapped to a word, so shared hash-id prefixes still give
    shared text prefixes (token boundaries, and so exact lengths, depend on the server's tokenizer).
    """
    ids = prompt_token_ids(request, length=length, salt=salt, vocab_size=vocab_size)
    return " ".join(_WORDS[i % len(_WORDS)] for i in ids)
