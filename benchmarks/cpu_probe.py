"""How fast this host's CPU is, moment by moment: a fixed unit of pure-Python work (~0.2 ms)
every 2 ms, each timed. Run beside a latency benchmark, it shows the moments the host itself
was slow (a shared VM's CPU can run several times slower for tens of ms; nothing in the
process under test causes that), so latencies can be read against them.

    python benchmarks/cpu_probe.py OUT.csv SECONDS     (SIGTERM ends it early; it still writes)

OUT.csv: one line per unit, ``start,duration`` in seconds on time.perf_counter() (CLOCK_MONOTONIC
on Linux, so comparable with another process's perf_counter()).
"""

from __future__ import annotations

import signal
import sys
import time


def unit() -> int:
    s = 0
    for i in range(3000):
        s += i * i
    return s


def main() -> int:
    out, seconds = sys.argv[1], float(sys.argv[2])
    rows = []
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # SIGTERM: write what we have, exit
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not stop:
        t = time.perf_counter()
        unit()
        rows.append((t, time.perf_counter() - t))
        time.sleep(0.002)
    with open(out, "w") as f:
        f.writelines(f"{t:.6f},{d:.6f}\n" for t, d in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
