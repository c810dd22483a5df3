"""Redaction time against text length, for the shapes that used to make it quadratic.

Prints, per shape, the seconds to redact 8 k, 64 k and 512 k characters of it, and the ratio of
the last two (8 means linear; the old patterns gave ~64 for "a" and token-like runs: 8,000
characters took 0.84 s, 16,000 took 5 s). Run: python benchmarks/redaction.py
"""

from __future__ import annotations

import time

from vllm_otel import redact
from vllm_otel.redact import redact_text

SHAPES = {"a": "a", "a.a.": "a.", "-a-a": "-a", "hf_hf_": "hf_", "eyJ-": "eyJ-", "sk-": "sk-",
          "a=a=": "a=", "a://": "a://", "mixed": "Authorization: Bearer x://u:p@h --api-key a.b=c "}


def timed(text: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        redact._CLEAN.clear()
        t0 = time.perf_counter()
        redact_text(text)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    sizes = (8_000, 64_000, 512_000)
    print(f"{'shape':8} " + " ".join(f"{n:>10,}" for n in sizes) + "   ratio 512k/64k")
    for name, unit in SHAPES.items():
        t = [timed((unit * (n // len(unit) + 1))[:n]) for n in sizes]
        print(f"{name:8} " + " ".join(f"{x:9.4f}s" for x in t) + f"   {t[2] / t[1]:6.1f}")


if __name__ == "__main__":
    main()
