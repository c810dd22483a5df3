"""The real actuator and metrics sources: against a REAL vLLM with its control endpoints on, a real
Prometheus scraping it, and a local HTTP endpoint standing in for an external hook's far end
(load balancer, autoscaler): a plain recording HTTP server, nothing mocked in between.

vLLM starts once for this module (about a minute on these CPUs); run it under the heavy lock:
``flock /tmp/vllm-otel-heavy.lock .venv/bin/python -m pytest tests/test_actuators.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from vllm_otel.mitigate.actuators import (HttpActuator, PrometheusMetricsSource, ScrapeMetricsSource,
                                          build_actuator, build_metrics_source, render_template)
from vllm_otel.mitigate.models import AlertRecord, Mode, Target
from vllm_otel.mitigate.policy import ActuatorConfig, MetricsConfig, Policy
from vllm_otel.mitigate.strategies import ActuatorError, StrategyContext
from vllm_otel.testing.processes import engine_core_process, free_port

TOKEN = "control-test-token"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def control_vllm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("vllm")
    from vllm_otel.testing.services import VllmServer

    work = tmp_path_factory.mktemp("control-vllm")
    tok = work / "control-token"
    tok.write_text(TOKEN + "\n")
    srv = VllmServer(tiny_model, work, num_gpu_blocks=24, max_model_len=2048, name="vllm-control",
                     env={"VLLM_OTEL_CONTROL_TOKEN_FILE": str(tok)})
    srv.token_file = tok  # type: ignore[attr-defined]
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def target(control_vllm: Any) -> Target:
    return Target(instance=f"127.0.0.1:{control_vllm.port}")


@pytest.fixture(scope="module")
def actuator(control_vllm: Any) -> HttpActuator:
    return HttpActuator(ActuatorConfig.model_validate({"control": {"token_file": str(control_vllm.token_file)}}))


def status(actuator: HttpActuator, target: Target) -> dict[str, Any]:
    return run(actuator.call(target, "control.status", {}))["result"]


def complete(url: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": max_tokens, "ignore_eos": True})


@pytest.mark.vllm
def test_set_max_running_shows_in_status(actuator: HttpActuator, target: Target) -> None:
    slots = status(actuator, target)["engine"]["max_num_running_reqs"]
    out = run(actuator.call(target, "control.set_max_running", {"max_num_seqs": 3}))
    # The admission limit moves; the model runner's slot count stays.
    assert out["action"] == "set_max_running" and out["result"]["after"]["max_num_active_reqs"] == 3
    assert status(actuator, target)["engine"] == {**status(actuator, target)["engine"],
                                                  "max_num_active_reqs": 3, "max_num_running_reqs": slots}
    # Never above the slot count.
    run(actuator.call(target, "control.set_max_running", {"max_num_seqs": slots + 100}))
    assert status(actuator, target)["engine"]["max_num_active_reqs"] == slots


@pytest.mark.vllm
def test_queue_limit_zero_rejects_with_503_until_lifted(actuator: HttpActuator, target: Target,
                                                        control_vllm: Any) -> None:
    run(actuator.call(target, "control.set_queue_limits", {"max_num_queued_tokens": 5000}))
    run(actuator.call(target, "control.set_queue_limits", {"max_num_queued_reqs": 0}))
    try:
        # A limit left out keeps its value; bad ones are refused whole.
        assert {k: status(actuator, target)[k] for k in ("max_num_queued_reqs", "max_num_queued_tokens")} == \
            {"max_num_queued_reqs": 0, "max_num_queued_tokens": 5000}
        for bad, why in (({"max_num_queued_reqs": 3, "max_queue": 1}, "unknown max_queue"),
                         ({"max_num_queued_reqs": 3, "max_num_queued_tokens": "lots"}, "must be an integer"),
                         ({"max_num_queued_reqs": 3, "max_num_queued_tokens": -1}, "must be >= 0")):
            with pytest.raises(ActuatorError, match=f"HTTP 400: .*{why}"):
                run(actuator.call(target, "control.set_queue_limits", bad))
        assert status(actuator, target)["max_num_queued_reqs"] == 0
        r = complete(control_vllm.url)
        assert r.status_code == 503
    finally:
        run(actuator.call(target, "control.set_queue_limits",
                          {"max_num_queued_reqs": None, "max_num_queued_tokens": None}))
    assert status(actuator, target)["max_num_queued_reqs"] is None
    assert complete(control_vllm.url).status_code == 200


def wait_until(pred: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_metric(target: Target, pred: Any, timeout_s: float = 30) -> dict[str, float]:
    src = ScrapeMetricsSource()
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    values = run(src.snapshot(target)).values
    seen = []  # what the gauges showed, for the failure message
    while time.monotonic() < deadline and not pred(values):
        seen.append((round(time.monotonic() - t0, 1), values.get("running"), values.get("waiting")))
        time.sleep(0.1)
        values = run(src.snapshot(target)).values
    assert pred(values), (values, sorted(set(seen), key=lambda x: x[0])[-40:])
    return values


SLICES_S = 20  # freeze_when: how long to try the sliced way first


def generated_tokens(url: str) -> float | None:
    """vLLM's own ``vllm:generation_tokens_total`` (summed over its labels), for failure messages."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    vals = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("vllm:generation_tokens_total")]
    return sum(vals) if vals else None


def freeze_when(core_pid: int, target: Target, pred: Any, timeout_s: float = 120,
                server: Any = None) -> dict[str, float]:
    """Freeze the engine core (SIGSTOP) at a moment the front end's gauges satisfy ``pred``; returns
    with the core frozen and the gauges read while it is.

    First, the core runs in short slices, frozen in between, and the gauges are read while it is
    frozen: the front end is idle then and answers at once. The slices grow (0.1 s, x1.5, up to 1 s):
    short enough to catch the batch at its first step, long enough for a slow step on a loaded
    machine. That nearly always ends within the first few slices. Twice in CI the gauges never moved
    that way (90 s of slices, cause unknown; the failure message now says what the core did). So
    after ``SLICES_S`` the core runs freely and the gauges are read while it does: the front end is
    then starved of CPU by the engine core and its worker (a /metrics GET took 12-28 s here), but
    it answers with the gauges as they are when it serves the request. Once they satisfy ``pred``
    the core is frozen and they are read again; if they no longer do, the core runs on."""
    import psutil

    core = psutil.Process(core_pid)
    src = ScrapeMetricsSource()
    patient = ScrapeMetricsSource(MetricsConfig(timeout_s=60))  # reads while the front end is starved
    start = time.monotonic()
    deadline = start + timeout_s
    slice_s = 0.1
    # (phase, slice length or read time, running, waiting, core CPU s) whenever the gauges change
    seen: list[tuple] = []
    cpu0 = sum(core.cpu_times()[:2])

    def note(phase: str, x: float, values: dict[str, float]) -> None:
        now = (values.get("running"), values.get("waiting"))
        if not seen or seen[-1][2:4] != now:
            seen.append((phase, round(x, 2), *now, round(sum(core.cpu_times()[:2]) - cpu0, 2)))

    tokens0 = None
    while time.monotonic() < start + SLICES_S:
        os.kill(core_pid, signal.SIGSTOP)
        if tokens0 is None and server is not None:  # read while frozen: a starved front end is slow
            tokens0 = generated_tokens(server.url)
        settle = time.monotonic() + 2  # the front end catches up on what the core already sent
        while True:
            values = run(src.snapshot(target)).values
            if pred(values):
                return values
            note("slices", slice_s, values)
            if time.monotonic() > settle:
                break
            time.sleep(0.1)
        os.kill(core_pid, signal.SIGCONT)
        time.sleep(slice_s)
        slice_s = min(slice_s * 1.5, 1.0)
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        values = run(patient.snapshot(target)).values  # the core runs: may take many seconds
        note("free", time.monotonic() - t0, values)
        if pred(values):
            os.kill(core_pid, signal.SIGSTOP)
            time.sleep(0.5)  # the front end catches up on what the core already sent
            values = run(src.snapshot(target)).values
            note("frozen", 0.5, values)
            if pred(values):
                return values
            os.kill(core_pid, signal.SIGCONT)
        time.sleep(0.2)
    os.kill(core_pid, signal.SIGSTOP)
    # Timed out, core frozen: gather what explains it, then fail.
    why = {"gauges": values, "changes": seen[-60:], "core_cpu_s": round(sum(core.cpu_times()[:2]) - cpu0, 2),
           "core_status": core.status()}
    os.kill(core_pid, signal.SIGCONT)
    if server is not None:
        why["generated_tokens"] = (tokens0, generated_tokens(server.url))
        try:
            act = HttpActuator(ActuatorConfig.model_validate({"control": {"token_file": str(server.token_file)}}))
            why["scheduler"] = status(act, target)
        except Exception as e:  # noqa: BLE001 - a diagnosis, the failure follows anyway
            why["scheduler"] = repr(e)
        why["log_tail"] = server.proc.log_tail().splitlines()[-30:]
    raise AssertionError(f"the gauges never satisfied the condition in {timeout_s:g} s: "
                         f"{json.dumps(why, indent=1, default=str)}")


@pytest.mark.vllm
def test_abort_requests_ends_the_oldest(actuator: HttpActuator, target: Target, control_vllm: Any) -> None:
    # The tiny model generates 1,900 tokens in well under a second: to have requests in flight
    # for as long as the test needs, the scheduler is paused ("keep": requests stay queued).
    run(actuator.call(target, "control.pause", {"mode": "keep"}))
    answers: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        answers[i] = complete(control_vllm.url, max_tokens=1900)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.3)  # distinct arrival times: "oldest" is well defined
        # A paused engine takes no steps, so vLLM's gauges do not move: ask the scheduler.
        wait_until(lambda: status(actuator, target)["engine"]["waiting"] == 3, "3 requests queued")
        out = run(actuator.call(target, "control.abort_requests", {"longest": 1}))["result"]
        assert len(out["aborted"]) == 1 and out["oldest_age_s"] > 0.5, out
        threads[0].join(30)
        assert answers[0].status_code == 200 and answers[0].json()["choices"][0]["finish_reason"] == "abort"
        assert 1 not in answers and 2 not in answers  # the others are untouched
    finally:
        run(actuator.call(target, "control.resume", {}))
    for t in threads:
        t.join(60)
    assert [answers[i].json()["choices"][0]["finish_reason"] for i in (1, 2)] == ["length", "length"]
    wait_metric(target, lambda v: v.get("running") == 0 and v.get("waiting") == 0)


@pytest.mark.vllm
def test_cache_gc_and_sleep(actuator: HttpActuator, target: Target, control_vllm: Any) -> None:
    assert run(actuator.call(target, "control.reset_prefix_cache", {}))["result"] == {"reset": True}
    workers = run(actuator.call(target, "control.gc_workers", {}))["result"]["workers"]
    assert len(workers) >= 1 and workers[0]["collected"] >= 0 and workers[0]["cuda_freed_bytes"] is None
    try:
        run(actuator.call(target, "control.sleep", {"level": 1}))
    except ActuatorError as e:  # the platform may not support sleep mode: vLLM says 409
        assert "HTTP 409" in str(e)
    else:
        assert run(actuator.call(target, "control.wake_up", {}))["result"]["awake"] is True
    assert complete(control_vllm.url).status_code == 200


@pytest.mark.vllm
def test_errors_carry_vllms_status_and_message(actuator: HttpActuator, target: Target,
                                               control_vllm: Any, tmp_path: Path) -> None:
    with pytest.raises(ActuatorError, match=r"HTTP 400: bad parameters for set_max_running"):
        run(actuator.call(target, "control.set_max_running", {}))
    with pytest.raises(ActuatorError, match="HTTP 400: unknown action"):
        run(actuator.call(target, "control.reboot_gpu", {}))
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    bad = HttpActuator(ActuatorConfig.model_validate({"control": {"token_file": str(wrong)}}))
    with pytest.raises(ActuatorError, match="HTTP 403: wrong token"):
        run(bad.call(target, "control.status", {}))
    with pytest.raises(ActuatorError, match=r"no control token file \(actuator.control.token_file\) configured"):
        run(HttpActuator().call(target, "control.status", {}))
    with pytest.raises(ActuatorError, match="no supervisor configured"):
        run(actuator.call(target, "supervisor.restart", {}))
    with pytest.raises(ActuatorError, match="unknown action"):
        run(actuator.call(target, "shell.rm", {}))
    down = Target(instance=f"127.0.0.1:{free_port()}")
    with pytest.raises(ActuatorError, match="ConnectError"):
        run(actuator.call(down, "control.status", {}))


@pytest.mark.vllm
def test_metrics_source_scrapes_the_target(target: Target, control_vllm: Any) -> None:
    policy = Policy.from_mapping({"targets": [{"instance": target.instance}], "escalation": {"strategy": None}})
    src = build_metrics_source(policy)
    assert isinstance(src, ScrapeMetricsSource)
    snap = run(src.snapshot(target))
    v = snap.values
    assert v["up"] == 1 and v["running"] == 0 and v["waiting"] == 0 and v["stalled"] == 0
    assert v["kv_cache_size_tokens"] == 24 * 128 and v["gpu_memory_utilization"] == 0.3
    assert v["gpu_collector_up"] == 0 and v["gpu_count"] == 0 and 0 < v["host_memory_available_fraction"] < 1
    assert v["workers"] >= 1 and v["sleeping"] == 0 and "preemptions_total" in v and abs(snap.at - time.time()) < 5
    dead = run(src.snapshot(Target(instance=f"127.0.0.1:{free_port()}")))
    assert dead.values == {"up": 0.0}  # a failed scrape is "down", as Prometheus records it


@pytest.mark.vllm
@pytest.mark.prometheus
def test_metrics_source_from_a_real_prometheus(target: Target, control_vllm: Any,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    from vllm_otel.testing.services import BinaryNotFound, PrometheusServer

    try:
        prom = PrometheusServer(tmp_path_factory.mktemp("prom-actuators"), targets={"vllm": [control_vllm.url]})
    except BinaryNotFound as e:
        pytest.skip(str(e))
    with prom:
        src = PrometheusMetricsSource(MetricsConfig(prometheus_url=prom.url, selector='job="vllm"'))
        snap = run(src.snapshot(target))
        scraped = run(ScrapeMetricsSource().snapshot(target))
        assert snap is not None
        for key in ("up", "running", "waiting", "stalled", "kv_cache_size_tokens", "gpu_memory_utilization",
                    "gpu_collector_up", "workers", "sleeping"):
            assert snap.values[key] == scraped.values[key], key
        assert run(src.snapshot(Target(instance="10.9.9.9:1"))) is None  # Prometheus knows nothing


@pytest.mark.vllm
def test_a_live_strategy_end_to_end(control_vllm: Any, target: Target) -> None:
    """lower_queue_limits through the real actuator and metrics: precondition from real load,
    new requests rejected with 503, verified once the in-flight ones are done."""
    policy = Policy.from_mapping({
        "targets": [{"instance": target.instance}], "escalation": {"strategy": None},
        "rules": [{"alertname": "VllmRequestsQueueing", "strategies": ["lower_queue_limits"]}],
        "strategies": {"lower_queue_limits": {"params": {"max_num_queued_reqs": 1, "verify_window_s": 240}}},
        # While the eight generate, the front end is starved of CPU and answers /metrics in 3-28 s
        # (measured); with the default 5 s timeout every read of a 90 s window failed
        # (a full run on a slower VM, 2026-11-28).
        "metrics": {"timeout_s": 60},
        "actuator": {"control": {"token_file": str(control_vllm.token_file)}}})
    act, src = build_actuator(policy), build_metrics_source(policy)
    # Eight requests queued while the scheduler is paused, then let through one at a time (our
    # own live limit). The tiny model produces a token every couple of milliseconds, and while
    # it does, vLLM's front end spends its event loop on the engine's outputs: /metrics and the
    # control endpoints wait until generation stops (measured: a /metrics GET takes as long as a
    # 1,900-token request). So the engine core is frozen (SIGSTOP) once its first step has reached
    # the front end (freeze_when): the gauges show one running and seven waiting, and the front
    # end answers at once, for as long as the test needs. SIGCONT lets the eight finish.
    run(act.call(target, "control.pause", {"mode": "keep"}))
    load = [threading.Thread(target=complete, args=(control_vllm.url, 1900), daemon=True) for _ in range(8)]
    for t in load:
        t.start()
    core = engine_core_process(control_vllm.proc.pid)
    stopped = False
    try:
        wait_until(lambda: status(act, target)["engine"]["waiting"] == 8, "8 requests queued", 60)
        run(act.call(target, "control.set_max_running", {"max_num_seqs": 1}))
        run(act.call(target, "control.resume", {}))
        stopped = True
        before = freeze_when(core.pid, target, lambda v: v.get("running") == 1 and v.get("waiting", 0) >= 2,
                             server=control_vllm)
        alert = AlertRecord(id=1, key="k", fingerprint="f", alertname="VllmRequestsQueueing",
                            instance=target.instance, failure_type=None, severity=None, starts_at=0.0,
                            labels={}, annotations={}, generator_url="", group_key="", received_at=0.0)
        ctx = StrategyContext(alert=alert, target=target, mode=Mode.AUTO, metrics_before=dict(before),
                              metrics_source=src)
        strat = policy.strategy("lower_queue_limits")
        assert strat.applies(ctx), before
        result = run(strat.execute(ctx, act))  # the queue limits live in the front end
        assert result.ok, result.detail
        # A new request is turned away with 503 at once while the eight are in flight.
        r = httpx.post(f"{control_vllm.url}/v1/completions", timeout=10,
                       json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1})
        assert r.status_code == 503, (r.status_code, r.text)
        # Status still answers with the front end's part while the engine core does not.
        t0 = time.monotonic()
        st = status(act, target)
        assert st["engine"] is None and "did not answer" in st["engine_error"], st
        assert st["max_num_queued_reqs"] == 1 and st["unfinished_requests"] > 1, st
        assert time.monotonic() - t0 < 8
        os.kill(core.pid, signal.SIGCONT)
        stopped = False
        ctx.result = result
        ctx.metrics_after = run(ctx.fresh_metrics())
        verdict = run(strat.verify(ctx))
        assert verdict.ok, verdict.detail
    finally:
        if stopped:
            os.kill(core.pid, signal.SIGCONT)
        run(act.call(target, "control.resume", {}))
        run(act.call(target, "control.set_max_running", {"max_num_seqs": 1000}))  # clamped to the slots
        run(act.call(target, "control.set_queue_limits", {"max_num_queued_reqs": None, "max_num_queued_tokens": None}))
        for t in load:
            t.join(120)


# --- external hooks --------------------------------------------------------------------------------------

class Endpoint:
    """A real local HTTP endpoint that records every request and answers with ``code``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.code = 200
        ep = self

        class H(BaseHTTPRequestHandler):
            def _any(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ep.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                    "body": json.loads(raw) if raw else None})
                out = json.dumps({"accepted": ep.code < 300, "error": "over quota"}).encode()
                self.send_response(ep.code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()
    yield ep
    ep.close()


def test_hooks_send_the_configured_call(endpoint: Endpoint, tmp_path: Path) -> None:
    (tmp_path / "lb-token").write_text("lb-secret\n")
    (tmp_path / "api-key").write_text("k-123\n")
    cfg = ActuatorConfig.model_validate({"hooks": {
        "rebalance": {"method": "PUT", "url": endpoint.url + "/pools/llm/members/${instance}?weight=${weight}",
                      "headers": {"X-Reason": "${alertname}"}, "header_files": {"X-Api-Key": str(tmp_path / "api-key")},
                      "token_file": str(tmp_path / "lb-token"),
                      "body": {"member": "${instance}", "weight": "${weight}", "note": "set ${instance} to ${weight}",
                               "tags": ["vllm", "${alertname}"]}},
        "scale_out": {"url": endpoint.url + "/scale", "body": {"delta": "${replicas_delta}"}}}})
    act = HttpActuator(cfg)
    t = Target(instance="10.0.0.7:8000")
    out = run(act.call(t, "hook.rebalance", {"weight": 0.25, "alertname": "VllmRequestsQueueing"}))
    assert out == {"status_code": 200, "body": {"accepted": True, "error": "over quota"}}
    req = endpoint.requests[-1]
    assert req["method"] == "PUT" and req["path"] == "/pools/llm/members/10.0.0.7%3A8000?weight=0.25"
    h = {k.lower(): v for k, v in req["headers"].items()}
    assert h["authorization"] == "Bearer lb-secret" and h["x-api-key"] == "k-123"
    assert h["x-reason"] == "VllmRequestsQueueing"
    assert req["body"] == {"member": "10.0.0.7:8000", "weight": 0.25, "note": "set 10.0.0.7:8000 to 0.25",
                           "tags": ["vllm", "VllmRequestsQueueing"]}
    endpoint.code = 429
    with pytest.raises(ActuatorError, match="hook scale_out answered HTTP 429: over quota"):
        run(act.call(t, "hook.scale_out", {"replicas_delta": 2}))
    assert endpoint.requests[-1]["body"] == {"delta": 2}
    with pytest.raises(ActuatorError, match=r"\$\{replicas_delta\}, which is not provided"):
        run(act.call(t, "hook.scale_out", {}))
    with pytest.raises(ActuatorError, match="no hook 'page'"):
        run(act.call(t, "hook.page", {}))


def test_hook_strategies_through_the_real_actuator(endpoint: Endpoint) -> None:
    """scale_resources and rebalance_load reach the hook with their parameters."""
    policy = Policy.from_mapping({
        "targets": [{"instance": "10.0.0.7:8000"}], "escalation": {"strategy": None},
        "rules": [{"alertname": "VllmRequestsQueueing", "strategies": ["scale_resources", "rebalance_load"]}],
        "strategies": {"scale_resources": {"params": {"replicas_delta": 2}}},
        "actuator": {"hooks": {"scale_out": {"url": endpoint.url + "/scale/${instance}",
                                             "body": {"add": "${replicas_delta}", "why": "${alertname}"}},
                               "rebalance": {"url": endpoint.url + "/weight", "body": {"w": "${weight}"}}}}})
    act = build_actuator(policy)
    alert = AlertRecord(id=1, key="k", fingerprint="f", alertname="VllmRequestsQueueing", instance="10.0.0.7:8000",
                        failure_type=None, severity=None, starts_at=0.0, labels={}, annotations={},
                        generator_url="", group_key="", received_at=0.0)
    ctx = StrategyContext(alert=alert, target=policy.target("10.0.0.7:8000"), mode=Mode.AUTO,
                          metrics_before={"waiting": 4, "kv_cache_usage": 0.5})
    for name in ("scale_resources", "rebalance_load"):
        s = policy.strategy(name)
        assert s.applies(ctx)
        assert run(s.execute(ctx, act)).ok
    assert [r["path"] for r in endpoint.requests] == ["/scale/10.0.0.7%3A8000", "/weight"]
    assert endpoint.requests[0]["body"] == {"add": 2, "why": "VllmRequestsQueueing"}
    assert endpoint.requests[1]["body"] == {"w": 0.5}


def test_templates_and_config_validation() -> None:
    assert render_template({"a": ["${x}", "x=${x}"]}, {"x": 3}) == {"a": [3, "x=3"]}
    assert render_template("/p/${x}", {"x": "a b/c"}, url=True) == "/p/a%20b%2Fc"
    assert render_template("$x ${", {"x": 1}) == "$x ${"  # only ${name} is a variable
    for bad in ({"hooks": {"h": {"url": "file:///etc/passwd"}}},
                {"hooks": {"h": {"url": "http://x", "method": "CONNECT"}}},
                {"supervisors": {"i": {"kind": "http"}}},
                {"supervisors": {"i": {"kind": "kubernetes", "namespace": "llm"}}}):
        with pytest.raises(ValueError):
            ActuatorConfig.model_validate(bad)

