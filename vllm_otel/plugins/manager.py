"""Load, order, run, hot-reload and publish plugins.

Sources: the ``vllm_otel.plugins`` entry-point group (installed packages) and ``*.py`` files in one
directory (``plugin_directory``). Files are watched (watchfiles): a changed file is imported again
and swapped in only when the new version imports, validates and initialises; otherwise the last good
version keeps running (rollback) and the failure is counted. A plugin whose ``execute()`` fails
``max_failures`` times in a row is disabled until its file changes. Nothing a plugin raises reaches
the service hosting it.

Only local files and installed packages are loaded: nothing received over the network is run.
"""

from __future__ import annotations

import graphlib
import hashlib
import importlib.metadata as md
import importlib.util
import inspect
import itertools
import logging
import math
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from vllm_otel.plugins.base import PluginError, PluginInterface, check_plugin_class

__all__ = ["PluginManager", "LoadedPlugin", "ENTRY_POINT_GROUP"]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "vllm_otel.plugins"
_seq = itertools.count()


@dataclass
class LoadedPlugin:
    name: str
    plugin_type: str
    source: str                       # the file, or "entry point NAME"
    cls: type
    instance: PluginInterface | None  # None for strategies (the receiver instantiates those)
    state: str = "active"             # active | disabled
    last_result: dict[str, float] = field(default_factory=dict)
    consecutive_failures: int = 0
    last_error: str = ""


def _guard_call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run plugin code; anything it raises (SystemExit included) becomes a PluginError."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - plugin code must not take the service down
        raise PluginError(f"{type(e).__name__}: {e}") from e


class PluginManager:
    """See the module docstring. ``settings``: per-plugin settings passed to ``initialize``.

    ``strategy_base`` / ``on_strategy``: classes deriving from ``strategy_base`` found in plugin
    files are handed to ``on_strategy(name, cls)`` (``cls`` None when the file is gone); the
    receiver registers them with ``register_strategy``.
    """

    def __init__(self, directory: str | Path | None = None, *, entry_points: bool = True,
                 settings: Mapping[str, Mapping[str, Any]] | None = None, strategy_base: type | None = None,
                 on_strategy: Callable[[str, type | None], None] | None = None, max_failures: int = 3,
                 interval_s: float = 5.0) -> None:
        self.directory = Path(directory) if directory else None
        if self.directory is not None and not self.directory.is_dir():
            raise PluginError(f"plugin directory {self.directory} does not exist")
        self.use_entry_points = entry_points
        self.settings = dict(settings or {})
        self.strategy_base = strategy_base
        self.on_strategy = on_strategy
        self.max_failures = max_failures
        self.interval_s = interval_s
        self.plugins: dict[str, LoadedPlugin] = {}
        self.failures: Counter[tuple[str, str]] = Counter()   # (plugin or file, stage) -> count
        self.reloads: Counter[str] = Counter()
        self.errors: dict[str, str] = {}                      # source -> last load error
        self._hashes: dict[str, str] = {}
        self._modules: dict[str, str] = {}                    # source -> module name in sys.modules
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def publish_to(self, registry: Any) -> None:
        """Publish results and plugin health on a prometheus ``CollectorRegistry``."""
        from vllm_otel.plugins.metrics import PluginMetrics

        registry.register(PluginMetrics(self))

    # --- loading ------------------------------------------------------------------------------

    def load_all(self) -> dict[str, str]:
        """Load every entry point and file, in dependency order; returns {source: error} of failures."""
        found: list[tuple[str, type]] = []
        if self.use_entry_points:
            for ep in md.entry_points(group=ENTRY_POINT_GROUP):
                src = f"entry point {ep.name}"
                try:
                    found.append((src, _guard_call(ep.load)))
                except PluginError as e:
                    self._fail(src, ep.name, "load", str(e))
        digests = {}
        if self.directory is not None:
            for path in sorted(p for p in self.directory.glob("*.py") if _is_plugin_file(p)):
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                try:
                    found += [(str(path), c) for c in self._import_file(path)]
                except PluginError as e:
                    self._fail(str(path), path.stem, "load", str(e))
        with self._lock:
            self._activate(found, replacing=(), single=False)
            # Unchanged files are not reloaded when the watcher reports them.
            self._hashes.update({s: d for s, d in digests.items() if s not in self.errors})
        return dict(self.errors)

    def load_file(self, path: str | Path) -> list[str]:
        """(Re)load one file; the names now active from it. On failure the previous version stays
        and :class:`PluginError` says why."""
        path = Path(path)
        src = str(path)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if self._hashes.get(src) == digest and src not in self.errors:
                return [p.name for p in self.plugins.values() if p.source == src]
            old = [p for p in self.plugins.values() if p.source == src]
            try:
                classes = self._import_file(path)
                self._activate([(src, c) for c in classes], replacing=old, single=True)
            except PluginError as e:
                self._fail(src, path.stem if not old else old[0].name, "load", str(e))
                for p in old:
                    self.failures[(p.name, "reload")] += 1
                    p.last_error = f"new version refused: {e}"
                kept = "; the previous version keeps running" if old else ""
                raise PluginError(f"{path.name}: {e}{kept}") from None
            self._hashes[src] = digest
            self.errors.pop(src, None)
            for p in old:
                self.reloads[p.name] += 1
            names = [p.name for p in self.plugins.values() if p.source == src]
        self.run_once(names)  # fresh results now, not at the next tick
        return names

    load_plugin_file = load_file  # the spec's name

    def unload_file(self, path: str | Path) -> None:
        src = str(path)
        with self._lock:
            for p in [p for p in self.plugins.values() if p.source == src]:
                self._retire(p)
                if p.instance is None and self.on_strategy:
                    self._call_on_strategy(p.name, None)
                del self.plugins[p.name]
            self._hashes.pop(src, None)
            self.errors.pop(src, None)
            sys.modules.pop(self._modules.pop(src, ""), None)

    def register_plugin(self, plugin: PluginInterface, config: Mapping[str, Any] | None = None) -> None:
        """Add an instance built in code (the spec's ``register_plugin``)."""
        problems = check_plugin_class(type(plugin))
        if problems:
            raise PluginError(f"{type(plugin).__qualname__}: " + "; ".join(problems))
        with self._lock:
            reqs = {r: self.plugins[r].instance for r in self._requires(type(plugin)) if r in self.plugins}
            _guard_call(plugin.initialize, {**self.settings.get(plugin.name, {}), **(config or {}), "plugins": reqs})
            self.plugins[plugin.name] = LoadedPlugin(plugin.name, plugin.plugin_type, "registered",
                                                     type(plugin), plugin)

    def create_plugin(self, name: str, plugin_type: str, execute_code: str, *, requires: Iterable[str] = (),
                      overwrite: bool = False) -> Path:
        """Write a plugin module into the plugin directory and load it (local Python API only)."""
        from vllm_otel.plugins.create import write_plugin

        if self.directory is None:
            raise PluginError("create_plugin needs a plugin directory")
        path = write_plugin(self.directory, name, plugin_type, execute_code, requires=requires,
                            overwrite=overwrite)
        self.load_file(path)
        return path

    def _import_file(self, path: Path) -> list[type]:
        mod_name = f"vllm_otel_plugin_{path.stem}_{next(_seq)}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"{path} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            _guard_call(spec.loader.exec_module, module)
        except PluginError:
            sys.modules.pop(mod_name, None)
            raise
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if c.__module__ == mod_name and self._is_plugin_class(c)]
        if not classes:
            sys.modules.pop(mod_name, None)
            raise PluginError(f"{path.name} defines no plugin (a PluginInterface subclass"
                              + (" or a strategy class)" if self.strategy_base else ")"))
        old = self._modules.get(str(path))
        self._modules[str(path)] = mod_name
        if old:
            sys.modules.pop(old, None)
        return classes

    def _is_plugin_class(self, c: type) -> bool:
        if issubclass(c, PluginInterface) and c is not PluginInterface:
            return True
        return bool(self.strategy_base and issubclass(c, self.strategy_base) and c is not self.strategy_base
                    and not inspect.isabstract(c))

    def _kind(self, cls: type) -> str:
        return "strategy" if self.strategy_base and issubclass(cls, self.strategy_base) else cls.plugin_type

    def _requires(self, cls: type) -> tuple[str, ...]:
        return tuple(getattr(cls, "requires", ()) or ())

    def _activate(self, found: list[tuple[str, type]], replacing: Iterable[LoadedPlugin], single: bool) -> None:
        """Start ``found`` in dependency order, replacing ``replacing``. A single-file reload is all
        or nothing (PluginError, nothing changed); a full load starts what it can and records the rest."""
        replacing = list(replacing)
        by_name: dict[str, tuple[str, type]] = {}
        for src, cls in found:
            if self._kind(cls) != "strategy":
                problems = check_plugin_class(cls)
                if problems:
                    self._reject(single, src, getattr(cls, "name", cls.__qualname__), "load", "; ".join(problems))
                    continue
            name = cls.name
            if name in by_name or (name in self.plugins and self.plugins[name].source != src
                                   and self.plugins[name] not in replacing):
                other = by_name[name][0] if name in by_name else self.plugins[name].source
                self._reject(single, src, name, "load", f"plugin name {name!r} is already used by {other}")
                continue
            by_name[name] = (src, cls)
        keep = {n for n, p in self.plugins.items() if p not in replacing}
        sorter = graphlib.TopologicalSorter()
        for name, (src, cls) in list(by_name.items()):
            missing = [r for r in self._requires(cls) if r not in by_name and r not in keep]
            if missing:
                self._reject(single, src, name, "load", f"plugin {name!r} requires {', '.join(missing)}, "
                                                        "which is not loaded")
                del by_name[name]
                continue
            sorter.add(name, *[r for r in self._requires(cls) if r in by_name])
        try:
            order = [n for n in sorter.static_order() if n in by_name]
        except graphlib.CycleError as e:
            cycle = " -> ".join(e.args[1])
            for n in set(e.args[1]):
                self._reject(single, by_name[n][0], n, "load", f"dependency cycle: {cycle}")
            # Without the cycle, order the rest.
            by_name = {n: v for n, v in by_name.items() if n not in set(e.args[1])}
            order = [n for n in _order(by_name, self._requires) if n in by_name]
        started: list[LoadedPlugin] = []
        available = {n: p for n, p in self.plugins.items() if p not in replacing}
        for name in order:
            src, cls = by_name[name]
            if any(r not in keep and r not in {p.name for p in started} for r in self._requires(cls)):
                self._reject(single, src, name, "load", f"plugin {name!r}: a requirement failed to start")
                continue
            try:
                started.append(self._start(name, src, cls, available))
                available[name] = started[-1]
            except PluginError as e:
                if single:
                    for p in started:
                        self._retire(p)
                    raise
                self._fail(src, name, "initialize", str(e))
        # Swap: strategies first (the registry may refuse), then retire the old versions.
        swapped: list[str] = []
        for p in started:
            if p.instance is None and self.on_strategy:
                try:
                    self._call_on_strategy(p.name, p.cls, raise_=True)
                    swapped.append(p.name)
                except PluginError:
                    for n in swapped:  # put the old classes back
                        old = next((o for o in replacing if o.name == n), None)
                        self._call_on_strategy(n, old.cls if old else None)
                    for q in started:
                        self._retire(q)
                    raise
        for p in replacing:
            self._retire(p)
            self.plugins.pop(p.name, None)
            if p.instance is None and self.on_strategy and p.name not in {q.name for q in started}:
                self._call_on_strategy(p.name, None)
        for p in started:
            self.plugins[p.name] = p
        self._restart_dependents({p.name for p in started} if replacing else set())

    def _start(self, name: str, src: str, cls: type, available: Mapping[str, LoadedPlugin]) -> LoadedPlugin:
        if self._kind(cls) == "strategy":
            return LoadedPlugin(name, "strategy", src, cls, None)
        inst = _guard_call(cls)
        reqs = {r: available[r].instance for r in self._requires(cls) if r in available}
        _guard_call(inst.initialize, {**self.settings.get(name, {}), "plugins": reqs})
        return LoadedPlugin(name, cls.plugin_type, src, cls, inst)

    def _restart_dependents(self, changed: set[str]) -> None:
        """Plugins that require a replaced one get a fresh instance wired to the new version."""
        if not changed:
            return
        for name in _order({n: (p.source, p.cls) for n, p in self.plugins.items()}, self._requires):
            p = self.plugins[name]
            if p.instance is None or not set(self._requires(p.cls)) & changed:
                continue
            self._retire(p)
            try:
                self.plugins[name] = self._start(name, p.source, p.cls, self.plugins)
            except PluginError as e:
                p.state, p.last_error = "disabled", str(e)
                self.failures[(name, "initialize")] += 1
            changed.add(name)

    def _retire(self, p: LoadedPlugin) -> None:
        if p.instance is not None:
            try:
                _guard_call(p.instance.shutdown)
            except PluginError as e:
                self.failures[(p.name, "shutdown")] += 1
                log.warning("vllm-otel plugin %s: shutdown failed: %s", p.name, e)

    def _call_on_strategy(self, name: str, cls: type | None, raise_: bool = False) -> None:
        try:
            self.on_strategy(name, cls)  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001
            if raise_:
                raise PluginError(f"strategy {name!r}: {e}") from e
            log.warning("vllm-otel plugin %s: restoring the strategy failed: %s", name, e)

    def _reject(self, single: bool, src: str, name: str, stage: str, why: str) -> None:
        if single:
            raise PluginError(why)
        self._fail(src, name, stage, why)

    def _fail(self, src: str, name: str, stage: str, why: str) -> None:
        self.failures[(name, stage)] += 1
        self.errors[src] = why
        log.warning("vllm-otel plugin %s (%s): %s failed: %s", name, src, stage, why)

    # --- running ------------------------------------------------------------------------------

    def run_once(self, names: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
        """Execute every active collector, predictor and exporter (or those named) once; their
        numeric results."""
        only = None if names is None else set(names)
        with self._lock:
            order = _order({n: (p.source, p.cls) for n, p in self.plugins.items()}, self._requires)
            todo = [self.plugins[n] for n in order if self.plugins[n].instance is not None
                    and (only is None or n in only)]
        out = {}
        for p in todo:
            if p.state != "active":
                continue
            try:
                result = _guard_call(p.instance.execute)  # type: ignore[union-attr]
            except PluginError as e:
                self.failures[(p.name, "execute")] += 1
                p.consecutive_failures += 1
                p.last_error = str(e)
                if p.consecutive_failures >= self.max_failures:
                    p.state = "disabled"
                    log.warning("vllm-otel plugin %s disabled after %d failures in a row: %s",
                                p.name, p.consecutive_failures, e)
                continue
            p.consecutive_failures = 0
            if p.plugin_type in ("collector", "predictor") and isinstance(result, Mapping):
                p.last_result = {str(k): float(v) for k, v in result.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
                out[p.name] = dict(p.last_result)
        return out

    def start(self, watch: bool = True) -> "PluginManager":
        """Run plugins every ``interval_s`` and (``watch``) reload changed files, on daemon threads."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run_loop, name="vllm-otel-plugins", daemon=True)]
        if watch and self.directory is not None:
            self._threads.append(threading.Thread(target=self._watch_loop, name="vllm-otel-plugin-watch",
                                                  daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            for p in self.plugins.values():
                self._retire(p)

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the loop outlives any bug
                log.exception("vllm-otel plugins: run failed")
            self._stop.wait(self.interval_s)

    def _watch_loop(self) -> None:
        import watchfiles

        assert self.directory is not None
        for changes in watchfiles.watch(self.directory, stop_event=self._stop, debounce=200, step=50,
                                        recursive=False, raise_interrupt=False,
                                        watch_filter=lambda _c, p: _is_plugin_file(Path(p))):
            for change, path in sorted(changes, key=lambda c: c[1]):
                try:
                    if change == watchfiles.Change.deleted or not Path(path).exists():
                        self.unload_file(path)
                    else:
                        names = self.load_file(path)
                        log.warning("vllm-otel plugins: loaded %s from %s", ", ".join(names), path)
                except PluginError as e:
                    log.warning("vllm-otel plugins: %s", e)
                except Exception:  # noqa: BLE001
                    log.exception("vllm-otel plugins: reloading %s failed", path)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = [{"name": p.name, "type": p.plugin_type, "source": p.source, "state": p.state,
                     "failures": sum(v for (n, _), v in self.failures.items() if n == p.name),
                     "reloads": self.reloads[p.name], "last_error": p.last_error,
                     "last_result": dict(p.last_result)} for p in self.plugins.values()]
            rows += [{"name": Path(src).stem, "type": "?", "source": src, "state": "failed",
                      "failures": 1, "reloads": 0, "last_error": err, "last_result": {}}
                     for src, err in self.errors.items()
                     if not any(p.source == src for p in self.plugins.values())]
        return rows


def _is_plugin_file(path: Path) -> bool:
    """``name.py``; not editor droppings (``.#name.py``) nor private helpers (``_util.py``)."""
    return path.suffix == ".py" and not path.name.startswith((".", "_"))


def _order(items: Mapping[str, tuple[str, type]], requires: Callable[[type], tuple[str, ...]]) -> list[str]:
    sorter = graphlib.TopologicalSorter()
    for name, (_, cls) in items.items():
        sorter.add(name, *[r for r in requires(cls) if r in items])
    try:
        return list(sorter.static_order())
    except graphlib.CycleError:
        return list(items)
