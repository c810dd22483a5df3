"""Trace loading (real Azure / Mooncake files and malformed ones) and prompt synthesis."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vllm_otel.loadgen.traces import (BLOCK_TOKENS, MIN_TOKEN_ID, SHIPPED_DIR, SHIPPED_TRACES, TraceError,
                                      TraceRequest, detect_format, load_trace, prompt_text,
                                      prompt_token_ids, resolve_trace)

# The traces shipped inside the package: every test here reads them, so a clone needs nothing else.
TRACES = SHIPPED_DIR


# ---------------------------------------------------------------------------------------------
# The real files


@pytest.mark.parametrize("name, rows", [
    ("AzureLLMInferenceTrace_code.csv", 8819),
    ("AzureLLMInferenceTrace_conv.csv", 19366),
    ("mooncake_conversation_trace.jsonl", 12031),
    ("mooncake_synthetic_trace.jsonl", 3993),
])
def test_real_trace_rows_are_sorted_offsets_from_zero(name: str, rows: int) -> None:
    reqs = load_trace(TRACES / name)
    assert len(reqs) == rows  # PROVENANCE.md row counts
    assert reqs[0].offset_s == 0.0
    assert all(a.offset_s <= b.offset_s for a, b in zip(reqs, reqs[1:]))
    # Every file spans roughly an hour or less (Azure ~1 h, Mooncake synthetic ~17 min).
    assert 600 < reqs[-1].offset_s < 3700
    assert all(r.input_tokens > 0 and r.output_tokens > 0 for r in reqs)


def test_azure_seven_digit_timestamps_give_sub_second_offsets() -> None:
    reqs = load_trace(TRACES / "AzureLLMInferenceTrace_code.csv", limit=2)
    # 18:17:03.9799600 -> 18:17:04.0319600
    assert reqs[1].offset_s == pytest.approx(0.052, abs=1e-5)
    assert (reqs[0].input_tokens, reqs[0].output_tokens, reqs[0].hash_ids) == (4808, 10, ())


def test_mooncake_hash_ids_and_millisecond_timestamps() -> None:
    reqs = load_trace(TRACES / "mooncake_conversation_trace.jsonl")
    assert reqs[0].hash_ids[:3] == (0, 1, 2)
    assert reqs[1].hash_ids[0] == 0  # the conversation trace's shared system prompt
    assert all(len(r.hash_ids) == math.ceil(r.input_tokens / BLOCK_TOKENS) for r in reqs)
    synthetic = load_trace(TRACES / "mooncake_synthetic_trace.jsonl", limit=3)
    assert synthetic[2].offset_s == pytest.approx(0.040)  # "timestamp": 40 (ms)


def test_the_four_public_traces_ship_compressed_with_their_licences() -> None:
    """A clone or a pip install has the traces: each one xz-compressed, found by its plain name,
    with the same bytes as published (sha256 in PROVENANCE.md) and its licence named there."""
    import hashlib
    import lzma

    provenance = (SHIPPED_DIR / "PROVENANCE.md").read_text()
    assert "CC-BY-4.0" in provenance and "Apache-2.0" in provenance and "Splitwise" in provenance
    for name in SHIPPED_TRACES:
        shipped = SHIPPED_DIR / f"{name}.xz"
        assert resolve_trace(name) == shipped
        assert resolve_trace(Path("/nowhere") / name) == shipped
        digest = hashlib.sha256(lzma.decompress(shipped.read_bytes())).hexdigest()
        assert digest in provenance, f"{name}: content differs from the published file"
        assert detect_format(name) == ("azure" if name.endswith(".csv") else "mooncake")


def test_a_gzip_trace_of_your_own_is_read_as_it_is(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "mine.csv.gz"
    path.write_bytes(gzip.compress(b"TIMESTAMP,ContextTokens,GeneratedTokens\n0.5,10,2\n1.5,20,3\n"))
    reqs = load_trace(path)
    assert [(r.offset_s, r.input_tokens, r.output_tokens) for r in reqs] == [(0.0, 10, 2), (1.0, 20, 3)]
    assert load_trace(tmp_path / "mine.csv") == reqs  # the compressed copy beside a missing plain file
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(TraceError, match="broken.csv.gz"):
        load_trace(tmp_path / "broken.csv.gz")


def test_start_and_limit_select_a_window_rebased_to_zero() -> None:
    path = TRACES / "AzureLLMInferenceTrace_conv.csv"
    full = load_trace(path)
    window = load_trace(path, start=100, limit=10)
    assert len(window) == 10
    assert window[0].offset_s == 0.0
    base = full[100].offset_s
    assert [r.offset_s for r in window] == pytest.approx([r.offset_s - base for r in full[100:110]])
    assert [r.input_tokens for r in window] == [r.input_tokens for r in full[100:110]]
    assert load_trace(path, start=len(full)) == []


# ---------------------------------------------------------------------------------------------
# Malformed and unusual input


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, text, where, what", [
    ("empty.csv", "", "empty.csv", "empty"),
    ("blank.jsonl", "\n  \n", "blank.jsonl", "empty"),
    ("header.csv", "time,in,out\n1,2,3\n", "header.csv:1", "bad CSV header"),
    ("header_only.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "header_only.csv", "no requests"),
    ("nonnum.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,2\n1,many,2\n", "nonnum.csv:3",
     "ContextTokens must be a whole number"),
    ("neg.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,5,-1\n", "neg.csv:2",
     "GeneratedTokens must be >= 0"),
    ("fields.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,5\n", "fields.csv:2", "expected 3 fields"),
    ("time.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,5\n", "time.csv:2", "TIMESTAMP"),
    ("json.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{oops\n', "json.jsonl:2",
     "invalid JSON"),
    ("missing.jsonl", '{"timestamp": 0, "input_length": 1}\n', "missing.jsonl:1", "output_length"),
    ("negjson.jsonl", '\n{"timestamp": 0, "input_length": -4, "output_length": 1}\n', "negjson.jsonl:2",
     "input_length must be >= 0"),
    ("strlen.jsonl", '{"timestamp": 0, "input_length": 1.5, "output_length": 1}\n', "strlen.jsonl:1",
     "whole number"),
    ("hash.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": "ab"}\n',
     "hash.jsonl:1", "hash_ids"),
    ("array.jsonl", "[1, 2, 3]\n", "array.jsonl:1", "JSON object"),
])
def test_malformed_trace_names_file_and_line(tmp_path: Path, name: str, text: str, where: str,
                                             what: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert where in message and what in message
    assert isinstance(info.value, ValueError)  # callers may catch ValueError generically


def test_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "nope.csv")


def test_blank_lines_are_skipped_and_unsorted_rows_sorted(tmp_path: Path) -> None:
    csv_path = _write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n\n"
                      "2023-11-16 18:00:02.5000000,30,3\n\n2023-11-16 18:00:01.0000000,10,1\n")
    assert load_trace(csv_path) == [TraceRequest(0.0, 10, 1), TraceRequest(1.5, 30, 3)]
    jsonl_path = _write(tmp_path, "t.jsonl", '\n{"timestamp": 500, "input_length": 3, '
                        '"output_length": 4, "hash_ids": [7]}\n\n{"timestamp": 250, '
                        '"input_length": 1, "output_length": 2}\n')
    assert load_trace(jsonl_path) == [TraceRequest(0.0, 1, 2), TraceRequest(0.25, 3, 4, (7,))]


def test_format_is_sniffed_when_the_extension_says_nothing(tmp_path: Path) -> None:
    moon = _write(tmp_path, "trace.txt", '{"timestamp": 0, "input_length": 2, "output_length": 1}\n')
    azure = _write(tmp_path, "trace.dat", "TIMESTAMP,ContextTokens,GeneratedTokens\n0.5,2,1\n")
    assert detect_format(moon) == "mooncake" and detect_format(azure) == "azure"
    assert load_trace(moon) == [TraceRequest(0.0, 2, 1)]
    assert load_trace(azure) == [TraceRequest(0.0, 2, 1)]  # numeric seconds are accepted too


# ---------------------------------------------------------------------------------------------
# Prompt synthesis


@pytest.mark.parametrize("n", [1, 7, BLOCK_TOKENS - 1, BLOCK_TOKENS, BLOCK_TOKENS + 1, 6758])
def test_token_prompts_have_exact_length_and_stay_in_vocab(n: int) -> None:
    for req in (TraceRequest(0, n, 1), TraceRequest(0, n, 1, tuple(range(math.ceil(n / 512))))):
        ids = prompt_token_ids(req, salt=3, vocab_size=100)
        assert len(ids) == n
        assert all(MIN_TOKEN_ID <= i < 100 for i in ids)
        assert ids == prompt_token_ids(req, salt=3, vocab_size=100)  # deterministic


def test_shared_hash_ids_share_exactly_their_blocks() -> None:
    a = TraceRequest(0, 1500, 1, (0, 1, 2))
    b = TraceRequest(0, 1200, 1, (0, 1, 9))
    c = TraceRequest(0, 700, 1, (5, 1))
    ids_a, ids_b, ids_c = (prompt_token_ids(r, salt=s) for s, r in enumerate((a, b, c)))
    assert ids_a[:1024] == ids_b[:1024]  # two shared blocks -> a 1024-token shared prefix
    assert ids_a[1024:1200] != ids_b[1024:1200]
    assert ids_c[:512] != ids_a[:512]  # same block later in the prompt is still not a prefix
    assert ids_c[512:700] == ids_a[512:700]  # ... but its content is the block's content


def test_requests_without_hash_ids_do_not_share_prefixes() -> None:
    req = TraceRequest(0, 600, 1)
    assert prompt_token_ids(req, salt=1)[:16] != prompt_token_ids(req, salt=2)[:16]
    assert prompt_token_ids(req, salt=1) == prompt_token_ids(req, salt=1)


def test_clipped_prompt_is_a_prefix_of_the_full_one() -> None:
    req = TraceRequest(0, 2000, 1, (4, 5, 6, 7))
    assert prompt_token_ids(req, length=100) == prompt_token_ids(req)[:100]


def test_hash_ids_shorter_than_input_are_padded() -> None:
    ids = prompt_token_ids(TraceRequest(0, 1000, 1, (0,)))
    assert len(ids) == 1000 and ids[:512] == prompt_token_ids(TraceRequest(0, 512, 1, (0,)))


def test_text_prompts_have_one_word_per_token_and_share_prefixes() -> None:
    a = prompt_text(TraceRequest(0, 700, 1, (0, 1)))
    b = prompt_text(TraceRequest(0, 600, 1, (0, 2)))
    assert len(a.split()) == 700 and len(b.split()) == 600
    assert a.split()[:512] == b.split()[:512]


def test_vocab_size_must_leave_room_above_special_ids() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        prompt_token_ids(TraceRequest(0, 3, 1), vocab_size=MIN_TOKEN_ID)
