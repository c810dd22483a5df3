"""``vllm-otel tiny-model DIR``."""

from __future__ import annotations

import argparse
import json
import sys

from vllm_otel.testing.tiny_model import DEFAULT_MAX_POSITIONS

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny random Llama (no download) that vLLM serves on CPU",
                       description="Write a tiny random Llama with a locally trained byte-level BPE "
                                   "tokenizer and a chat template. vLLM loads it on CPU "
                                   "(--dtype float32); outputs are random text.")
    p.add_argument("directory", help="output directory (created)")
    p.add_argument("--max-position-embeddings", type=int, default=DEFAULT_MAX_POSITIONS,
                   help="longest sequence the model accepts (default %(default)s, enough for the bundled traces)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON description instead of text")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        from vllm_otel.testing.tiny_model import write_tiny_model

        out = write_tiny_model(args.directory, max_position_embeddings=args.max_position_embeddings,
                               seed=args.seed)
    except ImportError as e:
        print(f"vllm-otel tiny-model needs torch, transformers and tokenizers ({e}); "
              "install vllm-otel[cpu] or vllm-otel[gpu]", file=sys.stderr)
        return 2
    info = {"directory": str(out), "max_position_embeddings": args.max_position_embeddings}
    print(json.dumps(info) if args.json else f"tiny model written to {out}")
    return 0
