"""Benchmark-only CPU accounting inside a real vLLM API server (benchmarks/plugin_cost.py --probe).

Python imports ``sitecustomize`` at start-up in every process; this one acts only where
``VLLM_OTEL_COST_PROBE`` names an output file and only in vLLM's API-server process (the one
that runs ``vllm.entrypoints``). It wraps the vllm-otel functions that run on vLLM's event-loop
thread with a thread-CPU counter (``time.thread_time``), and every second writes those counters
and the CPU of every thread of the process (``/proc/self/task/*/stat``, named by Python's thread
names where there is one) to the file. Production code knows nothing of this.
"""

import os
import sys

_OUT = os.environ.get("VLLM_OTEL_COST_PROBE")

_ARGV = getattr(sys, "orig_argv", sys.argv)  # sys.argv lacks the module name this early

if _OUT and any("vllm.entrypoints" in a for a in _ARGV[:4]) and "--model" in _ARGV:
    import atexit
    import functools
    import json
    import threading
    import time

    _TICK = os.sysconf("SC_CLK_TCK")
    _counters: dict = {}

    def _timed(name, fn):  # noqa: ANN001, ANN202
        c = _counters.setdefault(name, [0, 0.0])

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                c[0] += 1
                c[1] += time.thread_time() - t

        return wrapper

    def _install() -> None:
        from vllm_otel.instrument import requests, stat_logger

        stat_logger.OtelStatLogger.record = _timed("stat_logger.record (per engine step: on_step, "
                                                   "histograms, span sampling, registry)",
                                                   stat_logger.OtelStatLogger.record)
        requests.RequestContextMiddleware._record = _timed("middleware: record request",
                                                           requests.RequestContextMiddleware._record)
        requests.RequestRegistry.close = _timed("middleware: close request", requests.RequestRegistry.close)

    def _threads() -> dict:
        names = {t.native_id: t.name for t in threading.enumerate()}
        out: dict = {}
        main = threading.main_thread().native_id
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            name = "main (event loop)" if int(tid) == main else names.get(int(tid), f"native:{comm}")
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
        return out

    def _dump() -> None:
        doc = {"counters": {k: list(v) for k, v in _counters.items()}, "threads": _threads(), "at": time.time()}
        tmp = _OUT + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, _OUT)

    def _loop() -> None:
        while True:
            time.sleep(1.0)
            try:
                _dump()
            except Exception:  # noqa: BLE001 - a probe must never disturb the server
                pass

    try:
        _install()
        threading.Thread(target=_loop, name="cost-probe", daemon=True).start()
        atexit.register(_dump)
    except Exception:  # noqa: BLE001
        pass
