"""Test-only fault injection for a real vLLM: on PYTHONPATH only where a test puts it.

Python imports ``sitecustomize`` at start-up in every process (vLLM's API server, engine core and
workers alike), before vLLM or our plugins load. When ``VLLM_OTEL_FAULT_HOOKS`` names hooks
(comma-separated, or ``*``), the body of each named hook is replaced by one that raises, and the
real :func:`vllm_otel.instrument.guard.guarded` wraps it as in production: a test then proves on
a real vLLM that a failing hook never reaches vLLM. Production code knows nothing of this.
"""

import functools
import os

_RAISE_IN = frozenset(filter(None, os.environ.get("VLLM_OTEL_FAULT_HOOKS", "").split(",")))

if _RAISE_IN:
    from vllm_otel.instrument import guard as _guard

    _real_guarded = _guard.guarded

    def _faulty_guarded(name, default=None):  # noqa: ANN001, ANN202
        real_deco = _real_guarded(name, default)
        if name not in _RAISE_IN and "*" not in _RAISE_IN:
            return real_deco

        def deco(fn):  # noqa: ANN001, ANN202
            @functools.wraps(fn)
            def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                raise RuntimeError(f"vllm-otel test fault: deliberate failure in hook {name}")

            return real_deco(failing)

        return deco

    _guard.guarded = _faulty_guarded
