"""Plugins: loading from real files in dependency order, dependency errors by name, hot reload with
rollback, failing plugins disabled and counted, create_plugin, strategy plugins joining the
catalog, and all of it in a real running `vllm-otel receiver`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import yaml

from vllm_otel.plugins import PluginError, PluginInterface, PluginManager, create_plugin

ROOT = Path(__file__).resolve().parents[2]


def write(d: Path, name: str, body: str) -> Path:
    p = d / f"{name}.py"
    p.write_text(textwrap.dedent(body))
    return p


def collector(name: str, value: float, requires: tuple = (), extra: str = "") -> str:
    return f"""
from vllm_otel.plugins import PluginInterface

class P(PluginInterface):
    name = {name!r}
    plugin_type = "collector"
    requires = {requires!r}

    def initialize(self, config):
        self.config = config
{textwrap.indent(textwrap.dedent(extra), '    ')}
    def execute(self):
        return {{"value": {value}, "label": "not a number"}}
"""


def test_load_in_dependency_order_with_requirements_passed(tmp_path):
    write(tmp_path, "a_second", collector("second", 2, requires=("first",)))
    write(tmp_path, "z_first", collector("first", 1))
    m = PluginManager(tmp_path, entry_points=False, settings={"first": {"threshold": 7}})
    assert m.load_all() == {}
    assert m.plugins["first"].instance.config["threshold"] == 7
    assert m.plugins["second"].instance.config["plugins"] == {"first": m.plugins["first"].instance}
    assert m.run_once() == {"first": {"value": 1.0}, "second": {"value": 2.0}}  # strings not published


def test_missing_dependency_and_cycle_are_reported_by_name(tmp_path):
    write(tmp_path, "lonely", collector("lonely", 1, requires=("ghost",)))
    write(tmp_path, "ping", collector("ping", 1, requires=("pong",)))
    write(tmp_path, "pong", collector("pong", 1, requires=("ping",)))
    write(tmp_path, "fine", collector("fine", 1))
    m = PluginManager(tmp_path, entry_points=False)
    errors = m.load_all()
    assert "requires ghost" in errors[str(tmp_path / "lonely.py")]
    assert re.search(r"dependency cycle: (ping -> pong -> ping|pong -> ping -> pong)",
                     errors[str(tmp_path / "ping.py")])
    assert list(m.plugins) == ["fine"]  # the rest still loads
    assert {r["name"]: r["state"] for r in m.status()}["lonely"] == "failed"


def test_hot_reload_swaps_versions_and_rolls_back_a_broken_one(tmp_path):
    f = write(tmp_path, "probe", collector("probe", 1))
    m = PluginManager(tmp_path, entry_points=False)
    m.load_all()
    first = m.plugins["probe"].instance
    f.write_text(textwrap.dedent(collector("probe", 2)))
    assert m.load_file(f) == ["probe"]
    assert m.plugins["probe"].last_result == {"value": 2.0} and m.reloads["probe"] == 1
    # A syntax error: the previous version keeps running, the failure is counted.
    f.write_text("def broken(:\n")
    with pytest.raises(PluginError, match="previous version keeps running"):
        m.load_file(f)
    assert m.run_once() == {"probe": {"value": 2.0}}
    # A version whose initialize() raises: rolled back too, its own instance shut down.
    f.write_text(textwrap.dedent(collector("probe", 3, extra="raise RuntimeError('no config')\n")))
    with pytest.raises(PluginError, match="no config"):
        m.load_file(f)
    assert m.run_once() == {"probe": {"value": 2.0}}
    assert m.failures[("probe", "reload")] == 2
    assert m.plugins["probe"].instance is not first
    f.write_text(textwrap.dedent(collector("probe", 4)))
    m.load_file(f)
    assert m.run_once() == {"probe": {"value": 4.0}}


def test_reloading_a_requirement_restarts_its_dependents(tmp_path):
    base = write(tmp_path, "base", collector("base", 1))
    write(tmp_path, "user", collector("user", 5, requires=("base",)))
    m = PluginManager(tmp_path, entry_points=False)
    m.load_all()
    base.write_text(textwrap.dedent(collector("base", 10)))
    m.load_file(base)
    assert m.plugins["user"].instance.config["plugins"]["base"] is m.plugins["base"].instance


def test_a_failing_plugin_is_disabled_and_counted_and_a_new_version_revives_it(tmp_path):
    f = write(tmp_path, "flaky", """
        from vllm_otel.plugins import PluginInterface
        class Flaky(PluginInterface):
            name = "flaky"
            def execute(self):
                raise SystemExit("plugins must not end the service")
    """)
    write(tmp_path, "steady", collector("steady", 1))
    m = PluginManager(tmp_path, entry_points=False, max_failures=3)
    m.load_all()
    for _ in range(4):
        out = m.run_once()
    assert out == {"steady": {"value": 1.0}}
    assert m.plugins["flaky"].state == "disabled" and m.failures[("flaky", "execute")] == 3
    f.write_text(textwrap.dedent(collector("flaky", 9)))
    m.load_file(f)
    assert m.plugins["flaky"].state == "active" and m.run_once()["flaky"] == {"value": 9.0}


def test_watchfiles_reloads_on_change_and_unloads_on_delete(tmp_path):
    f = write(tmp_path, "watched", collector("watched", 1))
    m = PluginManager(tmp_path, entry_points=False, interval_s=0.2)
    m.load_all()
    m.start()
    try:
        time.sleep(0.5)  # the watcher is set up
        f.write_text(textwrap.dedent(collector("watched", 2)))
        _wait(lambda: m.plugins["watched"].last_result.get("value") == 2.0)
        f.unlink()
        _wait(lambda: "watched" not in m.plugins)
    finally:
        m.stop()


def _wait(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_create_plugin_writes_a_module_that_loads_like_any_other(tmp_path):
    m = PluginManager(tmp_path, entry_points=False)
    path = m.create_plugin("custom_monitor", "monitor", execute_code="""
def execute(self):
    return {"custom_metric": 42}
""")
    assert path == tmp_path / "custom_monitor.py" and "class CustomMonitorPlugin" in path.read_text()
    assert m.run_once() == {"custom_monitor": {"custom_metric": 42.0}}
    # Bad input: clear error, nothing written.
    with pytest.raises(PluginError, match="does not compile"):
        m.create_plugin("broken_one", "collector", execute_code="def execute(self) return 1")
    with pytest.raises(PluginError, match="snake_case"):
        m.create_plugin("../escape", "collector", execute_code="def execute(self):\n    return {}")
    with pytest.raises(PluginError, match="exists"):
        m.create_plugin("custom_monitor", "collector", execute_code="def execute(self):\n    return {}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["custom_monitor.py"]
    # The module-level function writes the file only (a watching manager picks it up).
    assert Path(create_plugin(str(tmp_path), "other", "collector", "def execute(self):\n    return {'x': 1}")).exists()


def test_register_plugin_instance_as_in_the_spec():
    class Direct(PluginInterface):
        name = "direct"

        def execute(self):
            return {"n": 3}

    m = PluginManager(None, entry_points=False)
    m.register_plugin(Direct())
    assert m.run_once() == {"direct": {"n": 3.0}}
    with pytest.raises(PluginError, match="execute"):
        m.register_plugin(type("NoExec", (PluginInterface,), {"name": "noexec"})())


def test_example_gpu_temperature_plugin_reports_no_gpu_cleanly_and_reads_nvml(tmp_path, monkeypatch):
    import shutil
    import types

    shutil.copy(ROOT / "examples" / "plugins" / "gpu_temperature.py", tmp_path)
    # On this host there is no GPU: nvmlInit fails like the real library does without a driver.
    fake_missing = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("libnvidia-ml.so.1 not found")))
    monkeypatch.setitem(sys.modules, "pynvml", fake_missing)
    m = PluginManager(tmp_path, entry_points=False, settings={"gpu_temperature": {"temp_threshold": 70}})
    m.load_all()
    assert m.plugins["gpu_temperature"].instance.execute() == {"status": "no GPU", "gpu_count": 0}
    # With GPUs: a fake at the pynvml boundary (no GPU here), two GPUs at 65 and 75 C.
    temps = [65, 75]
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None, NVML_TEMPERATURE_GPU=0,
                                 nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetTemperature=lambda h, s: temps[h])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    m2 = PluginManager(tmp_path, entry_points=False, settings={"gpu_temperature": {"temp_threshold": 70}})
    m2.load_all()
    assert m2.run_once()["gpu_temperature"] == {"gpu_count": 2.0, "gpu0_temperature_celsius": 65.0,
                                                "gpu1_temperature_celsius": 75.0, "gpus_over_threshold": 1.0}


STRATEGY = '''
from vllm_otel.mitigate.strategies import ActionResult, Strategy, StrategyParams, Verification


class Params(StrategyParams):
    level: int = {level}


class NudgeScheduler(Strategy):
    """Log a nudge (touches nothing): a strategy from a plugin file."""

    name = "nudge_scheduler"
    invasiveness = 1
    needs_target = False
    Params = Params

    async def execute(self, ctx, actuator):
        return ActionResult(ok=True, detail="nudged")

    async def verify(self, ctx):
        return Verification(ok=True, detail="fine")
'''


ESCALATION = {"strategies": {"escalate_to_human": {"params": {"url": "http://127.0.0.1:9/hook"}}}}


def test_strategy_plugins_join_the_catalog_and_reload_into_the_policy(tmp_path):
    from vllm_otel.mitigate.plugin_hooks import make_plugin_manager
    from vllm_otel.mitigate.policy import Policy
    from vllm_otel.mitigate.strategies import REGISTRY

    f = tmp_path / "nudge.py"
    f.write_text(STRATEGY.format(level=1))
    holder: dict = {}
    m = make_plugin_manager(str(tmp_path), holder)
    try:
        assert m.load_all() == {}
        assert "nudge_scheduler" in REGISTRY
        policy = Policy.from_mapping({"targets": [], "rules": [{"alertname": "X", "strategies": ["nudge_scheduler"]}],
                                      **ESCALATION})
        holder["policy"] = policy
        first = policy.strategy("nudge_scheduler")
        f.write_text(STRATEGY.format(level=2))
        m.load_file(f)
        assert policy.strategy("nudge_scheduler") is not first
        assert policy.strategy("nudge_scheduler").params.level == 2
        # A broken new version (not a valid strategy: no docstring) is refused; the old one stays.
        doc = '"""Log a nudge (touches nothing): a strategy from a plugin file."""'
        f.write_text(STRATEGY.format(level=3).replace(doc, "pass"))
        with pytest.raises(PluginError):
            m.load_file(f)
        assert REGISTRY.get("nudge_scheduler").Params().level == 2
        # A plugin cannot replace a built-in strategy.
        (tmp_path / "evil.py").write_text(STRATEGY.format(level=1).replace("nudge_scheduler", "escalate_to_human"))
        with pytest.raises(PluginError, match="built-in"):
            m.load_file(tmp_path / "evil.py")
        assert REGISTRY.get("escalate_to_human").__module__ == "vllm_otel.mitigate.strategies.escalate"
    finally:
        m.unload_file(f)
    assert "nudge_scheduler" not in REGISTRY


def test_register_strategy_by_name_as_in_the_spec():
    from vllm_otel.mitigate.strategies import REGISTRY, StrategyConfigError, register_strategy

    ns: dict = {}
    exec(compile(STRATEGY.format(level=1), "<test strategy>", "exec"), ns)  # noqa: S102 - test's own code
    cls = ns["NudgeScheduler"]
    with pytest.raises(StrategyConfigError, match="not a Strategy"):
        register_strategy("not_a_strategy", object)  # type: ignore[arg-type]
    try:
        # Under the name a policy will use: the class's own, or another one for the same code.
        for name in ("nudge_scheduler", "nudge_gently"):
            registered = register_strategy(name, cls)
            assert issubclass(registered, cls) and registered.name == name and REGISTRY.get(name) is registered
    finally:
        REGISTRY.unregister("nudge_scheduler")
        REGISTRY.unregister("nudge_gently")


# --- a real running service -------------------------------------------------------------------------

def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_receiver_loads_hot_reloads_and_rolls_back_plugins(tmp_path):
    from vllm_otel.testing.processes import ManagedProcess, free_port

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    probe = write(plugins, "probe", collector("probe", 1))
    (plugins / "nudge.py").write_text(STRATEGY.format(level=1))
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"targets": [], "default_mode": "dry-run", **ESCALATION,
                                      "rules": [{"alertname": "X", "strategies": ["nudge_scheduler"]}]}))
    # Without the plugins the policy names an unknown strategy; with them it is valid.
    base = [sys.executable, "-m", "vllm_otel", "receiver", "--config", str(policy)]
    r = subprocess.run([*base, "--check-config"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nudge_scheduler" in r.stderr
    r = subprocess.run([*base, "--check-config", "--plugin-dir", str(plugins)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "2 plugins" in r.stdout, r.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ManagedProcess("receiver", [*base, "--port", str(port), "--allow-unauthenticated",
                                       "--plugin-dir", str(plugins), "--db-url", f"sqlite:///{tmp_path / 'r.db'}"],
                          tmp_path / "receiver.log")
    with proc, httpx.Client(timeout=5) as c:
        _wait(lambda: _ok(c, f"{url}/healthz"), timeout=30)
        scrape = lambda: c.get(f"{url}/metrics").text  # noqa: E731
        _wait(lambda: _metric(scrape(), "vllm_otel_plugin_value", plugin="probe", key="value") == 1.0)
        assert _metric(scrape(), "vllm_otel_plugin_up", plugin="nudge_scheduler", type="strategy") == 1.0
        time.sleep(0.5)
        probe.write_text(textwrap.dedent(collector("probe", 2)))
        _wait(lambda: _metric(scrape(), "vllm_otel_plugin_value", plugin="probe", key="value") == 2.0)
        assert _metric(scrape(), "vllm_otel_plugin_reloads_total", plugin="probe") == 1.0
        probe.write_text("this is not python\n")
        _wait(lambda: (_metric(scrape(), "vllm_otel_plugin_failures_total", plugin="probe", stage="load") or 0) >= 1)
        text = scrape()
        assert _metric(text, "vllm_otel_plugin_value", plugin="probe", key="value") == 2.0  # rolled back
        assert _metric(text, "vllm_otel_plugin_up", plugin="probe", type="collector") == 1.0
        # No route runs or creates plugins over HTTP.
        assert c.post(f"{url}/plugins", json={"code": "print(1)"}).status_code in (404, 405)
        assert proc.alive()


def _ok(c: httpx.Client, url: str) -> bool:
    try:
        return c.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def test_plugins_check_command(tmp_path):
    write(tmp_path, "good", collector("good", 1))
    r = subprocess.run([sys.executable, "-m", "vllm_otel", "plugins", "check", "--dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [(p["name"], p["state"], p["last_result"]) for p in __import__("json").loads(r.stdout)] == \
        [("good", "active", {"value": 1.0})]
    write(tmp_path, "bad", "raise ImportError('needs a package this host lacks')\n")
    r = subprocess.run([sys.executable, "-m", "vllm_otel", "plugins", "check", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "failed" in r.stdout and "needs a package this host lacks" in r.stdout


def test_entry_point_plugins_load_like_files(tmp_path, monkeypatch):
    """An installed package's `vllm_otel.plugins` entry point (a real dist-info on sys.path)."""
    site = tmp_path / "site"
    (site / "acme_probe-1.0.dist-info").mkdir(parents=True)
    (site / "acme_probe-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-probe\nVersion: 1.0\n")
    (site / "acme_probe-1.0.dist-info" / "entry_points.txt").write_text(
        "[vllm_otel.plugins]\nacme = acme_probe:AcmeProbe\n")
    (site / "acme_probe.py").write_text(
        textwrap.dedent(collector("acme", 5)).replace("class P(", "class AcmeProbe("))
    monkeypatch.syspath_prepend(str(site))
    m = PluginManager(None)
    assert m.load_all() == {}
    assert m.plugins["acme"].source == "entry point acme"
    assert m.run_once()["acme"] == {"value": 5.0}
