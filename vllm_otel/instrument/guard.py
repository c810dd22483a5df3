"""Never let our code take vLLM down.

vLLM calls general plugins, stat loggers and endpoint hooks without a try/except, so an exception
from us would stop the API server or the engine core. Everything we run inside vLLM goes through
:func:`guarded`, which logs the first failure of each hook at WARNING (later ones at DEBUG, so a
broken hook on the hot path cannot flood the log) and counts every failure for export.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import Counter
from typing import Any, Callable, TypeVar

__all__ = ["guarded", "hook_errors", "logger"]

logger = logging.getLogger("vllm_otel")

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
hook_errors: Counter[str] = Counter()  # hook name -> failures, exported as vllm_otel_hook_errors_total

# Test hook: the named hooks (comma-separated, or "*") raise on every call, so a test can prove on
# a real vLLM that a failing hook never reaches vLLM. Read once: the hot path pays one set lookup.
_RAISE_IN = frozenset(filter(None, os.environ.get("VLLM_OTEL_TEST_RAISE_IN_HOOKS", "").split(",")))


def guarded(name: str, default: Any = None) -> Callable[[F], F]:
    """Decorator: run the function, swallow and count any exception, return ``default`` instead."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                if _RAISE_IN and (name in _RAISE_IN or "*" in _RAISE_IN):
                    raise RuntimeError(f"vllm-otel test: deliberate failure in hook {name}")
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - the whole point: nothing escapes into vLLM
                with _lock:
                    hook_errors[name] += 1
                    first = hook_errors[name] == 1
                (logger.warning if first else logger.debug)(
                    "vllm-otel hook %s failed; vLLM continues without it", name, exc_info=True)
                return default

        return wrapper  # type: ignore[return-value]

    return deco
