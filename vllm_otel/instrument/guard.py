"""Never let our code take vLLM down.

vLLM calls general plugins, stat loggers and endpoint hooks without a try/except, so an exception
from us would stop the API server or the engine core. Everything we run inside vLLM goes through
:func:`guarded`, which logs the first failure of each hook at WARNING (later ones at DEBUG, so a
broken hook on the hot path cannot flood the log) and counts every failure for export.

Tests inject failures from outside (tests/faults/sitecustomize.py wraps this decorator in a real
vLLM's processes); nothing here reads a test switch.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from typing import Any, Callable, TypeVar

__all__ = ["guarded", "hook_errors", "logger"]

logger = logging.getLogger("vllm_otel")

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
hook_errors: Counter[str] = Counter()  # hook name -> failures, exported as vllm_otel_hook_errors_total


def guarded(name: str, default: Any = None) -> Callable[[F], F]:
    """Decorator: run the function, swallow and count any exception, return ``default`` instead."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
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
