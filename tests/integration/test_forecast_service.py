"""The forecaster service: sources, cycle, publishing, bad input, CLI.

Fast tests serve a real vLLM exposition (``tests/data/vllm_metrics_sample.txt``, recorded verbatim
from the session vLLM; values rewritten per step where a test needs motion) over real HTTP, and
run the service on a fake clock, one cycle per call. Tests marked ``vllm`` / ``prometheus`` use the
session vLLM and a real Prometheus (run them under ``flock /tmp/vllm-otel-heavy.lock``).
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from vllm_otel.forecast.failures import FAILURE_TYPES
from vllm_otel.forecast.service import ForecasterService
from vllm_otel.forecast.promjson import in_shard
from vllm_otel.forecast.sources import (PrometheusSource, ScrapeSource, SourceError, parse_exposition,
                                        target_instance)
from vllm_otel.testing.processes import free_port

SAMPLE = Path(__file__).parents[1] / "data" / "vllm_metrics_sample.txt"
SAMPLE_TEXT = SAMPLE.read_text()
T0 = 1_800_000_000.0
# Small warm-up so the tests run few cycles; the rest are DetectorConfig defaults.
FAST = {"min_points": 4, "min_history_s": 0.0, "step_s": 5.0}


# -- helpers ---------------------------------------------------------------------------------------

def exposition(**values: float) -> str:
    """The recorded exposition with some series' values replaced (``kv=0.5``, ``tokens=...``)."""
    names = {"kv": "vllm:kv_cache_usage_perc", "running": "vllm:num_requests_running",
             "waiting": "vllm:num_requests_waiting", "preemptions": "vllm:num_preemptions_total",
             "tokens": "vllm:generation_tokens_total"}
    text = SAMPLE_TEXT
    for key, v in values.items():
        name = re.escape(names[key])
        val = "NaN" if isinstance(v, float) and math.isnan(v) else repr(float(v))
        text, n = re.subn(rf"^({name}\{{[^}}]*\}}) \S+$", rf"\g<1> {val}", text, flags=re.M)
        assert n == 1, key
    return text


class FakeVllm:
    """A real HTTP server answering ``/metrics`` with ``text`` (or an error code)."""

    def __init__(self) -> None:
        self.text = SAMPLE_TEXT
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = owner.text.encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self._srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._srv.daemon_threads = True
        self.port = self._srv.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self.running = True

    def stop(self) -> None:
        """Down for real: the port refuses connections afterwards."""
        if self.running:
            self._srv.shutdown()
            self._srv.server_close()
            self.running = False


class Silent:
    """Accepts TCP connections and never answers (a hung Prometheus)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, s: float = 5.0) -> float:
        self.t += s
        return self.t


@pytest.fixture
def fake_vllm() -> Iterator[FakeVllm]:
    srv = FakeVllm()
    yield srv
    srv.stop()


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there


def scrape(service_or_url: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics for real and parse it: {(sample name, sorted labels): value}."""
    url = service_or_url if isinstance(service_or_url, str) else service_or_url._server.url
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def samples(metrics: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in metrics.items() if n == name}


def moving(step: int, **extra: float) -> str:
    """A busy-looking instance at cycle ``step``: tokens grow, KV wanders, no preemptions."""
    vals = {"kv": 0.3 + 0.02 * (step % 5), "running": 4.0, "waiting": 0.0, "tokens": 10_000.0 + 700.0 * step,
            "preemptions": 17.0}
    vals.update(extra)
    return exposition(**vals)


def warm(service: ForecasterService, clock: Clock, servers: list[FakeVllm], cycles: int, start: int = 0) -> None:
    for k in range(start, start + cycles):
        for s in servers:
            s.text = moving(k)
        clock.tick()
        report = service.run_cycle()
        assert report.ok, report.errors


def probs(service: ForecasterService, unit: str) -> dict[str, float]:
    return dict(next(u for u in service.snapshot.units if u.unit == unit).probability)


def unit_of(service: ForecasterService, unit: str):  # noqa: ANN201
    return next(u for u in service.snapshot.units if u.unit == unit)


# -- sources ---------------------------------------------------------------------------------------

def test_target_instance() -> None:
    assert target_instance("127.0.0.1:8000") == ("http://127.0.0.1:8000/metrics", "127.0.0.1:8000")
    assert target_instance("http://h:9/") == ("http://h:9/metrics", "h:9")
    assert target_instance("https://h/custom") == ("https://h/custom", "h:443")
    with pytest.raises(ValueError):
        target_instance("http://")


def test_scrape_source_parses_recorded_vllm_exposition(fake_vllm: FakeVllm) -> None:
    src = ScrapeSource([fake_vllm.url], timeout=2)
    try:
        batch = src.fetch(T0)
    finally:
        src.close()
    f = batch.frame
    assert f.units == [fake_vllm.instance] and f.instances == [fake_vllm.instance]
    assert batch.model_names == {fake_vllm.instance: "tiny"} and batch.errors == []
    assert list(f.t) == [T0]
    v = {k: float(a[0, 0]) for k, a in f.values.items()}
    # The recorded values (see the sample): idle server after a replay with 17 preemptions.
    assert v["kv_usage"] == 0.0 and v["running"] == 0.0 and v["waiting"] == 0.0
    assert v["preemptions"] == 17.0 and v["generation_tokens"] == 9870.0
    assert v["process_memory"] > 1e9  # the vllm_otel per-process series, summed over processes
    les, counts = f.histograms["ttft"]
    assert les[-1] == math.inf and len(les) == 23 and counts[0, 0, -1] == 107.0


def test_parse_exposition_nan_and_garbage() -> None:
    rows = parse_exposition(exposition(kv=float("nan")), "h:1", T0, {"vllm:kv_cache_usage_perc"})
    assert len(rows) == 1 and rows[0]["metric"]["instance"] == "h:1"
    assert math.isnan(float(rows[0]["values"][0][1]))
    with pytest.raises(ValueError):
        parse_exposition("this is {not an exposition\n", "h:1", T0)


def test_scrape_source_partial_and_total_failure(fake_vllm: FakeVllm) -> None:
    dead = refused_url()
    src = ScrapeSource([fake_vllm.url, dead], timeout=1)
    try:
        batch = src.fetch(T0)
        assert batch.frame.units == [fake_vllm.instance]
        assert [i for i, _ in batch.errors] == [target_instance(dead)[1]]
        fake_vllm.status = 503
        with pytest.raises(SourceError, match="no target answered"):
            src.fetch(T0 + 5)
        fake_vllm.status = 200
        fake_vllm.text = "garbage {{{\n"
        with pytest.raises(SourceError, match="unparseable"):
            src.fetch(T0 + 10)
    finally:
        src.close()


def test_shard_splits_targets_without_fetching_others() -> None:
    targets = [f"127.0.0.1:{p}" for p in range(20000, 20012)]
    split = [ScrapeSource(targets, shard=(k, 3)).targets for k in (1, 2, 3)]
    insts = [inst for part in split for _, inst in part]
    assert sorted(insts) == sorted(targets) and len(set(insts)) == len(targets)
    assert all(part for part in split)


def test_prometheus_query_combines_selector() -> None:
    src = PrometheusSource("http://x:9090/", '{job="vllm"}', 1.0)
    assert src.query.startswith('{__name__=~"') and src.query.endswith(',job="vllm"}')
    assert "vllm:kv_cache_usage_perc" in src.query
    src.close()


# -- the service on fake data ------------------------------------------------------------------------

def test_too_little_data_gives_no_prediction_then_predictions(fake_vllm: FakeVllm) -> None:
    clock = Clock()
    svc = ForecasterService(ScrapeSource([fake_vllm.url], timeout=2), FAST, clock=clock,
                            registry=CollectorRegistry())
    svc.serve(port=0)
    try:
        warm(svc, clock, [fake_vllm], FAST["min_points"] - 1)
        u = unit_of(svc, fake_vllm.instance)
        assert u.probability == {} and not u.stale  # fresh data, too little of it: nothing made up
        m = scrape(svc)
        assert samples(m, "vllm_otel_failure_probability") == {}
        doc = svc.to_json()
        fails = doc["instances"][0]["failures"]
        assert set(fails) == set(FAILURE_TYPES)
        assert all(v["probability"] is None and v["status"] == "no_prediction" for v in fails.values())

        warm(svc, clock, [fake_vllm], 3, start=FAST["min_points"] - 1)
        p = probs(svc, fake_vllm.instance)
        assert {"kv_cache_exhaustion", "preemption_storm", "engine_stall"} <= set(p)
        assert all(0.0 <= x <= 1.0 for x in p.values())
        assert p["kv_cache_exhaustion"] < 0.5  # KV at ~30%: no alarm
        # No GPU, no memory limit, no queue limit learned yet (nothing ever waited), no new TTFT
        # observations: those failures stay unpredicted rather than guessed.
        assert not {"gpu_thermal", "gpu_hardware", "memory_exhaustion", "queue_overload", "ttft_slo_breach"} & set(p)

        m = scrape(svc)
        got = samples(m, "vllm_otel_failure_probability")
        key = tuple(sorted({"instance": fake_vllm.instance, "engine": "", "model_name": "tiny",
                            "failure_type": "kv_cache_exhaustion"}.items()))
        assert got[key] == pytest.approx(p["kv_cache_exhaustion"])
        fc = samples(m, "vllm_otel_forecast")
        kv_q = {dict(k)["quantile"]: v for k, v in fc.items() if dict(k)["signal"] == "kv_usage"}
        assert set(kv_q) == {"0.1", "0.5", "0.9"} and kv_q["0.1"] <= kv_q["0.5"] <= kv_q["0.9"]
        assert samples(m, "vllm_otel_forecaster_up")[()] == 1.0
        assert list(samples(m, "vllm_otel_forecaster_prediction_stale").values()) == [0.0]
        assert samples(m, "vllm_otel_forecaster_cycle_duration_seconds_count")[()] == 6.0
        r = httpx.get(f"{svc._server.url}/healthz", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        svc.stop()


def test_source_down_keeps_last_predictions_stale_and_ages(fake_vllm: FakeVllm) -> None:
    clock = Clock()
    svc = ForecasterService(ScrapeSource([fake_vllm.url], timeout=1), FAST, clock=clock, instance_ttl_s=60)
    warm(svc, clock, [fake_vllm], 6)
    before = probs(svc, fake_vllm.instance)
    assert before
    fake_vllm.stop()
    for k in range(1, 4):
        clock.tick()
        rep = svc.run_cycle()
        assert not rep.ok and rep.errors[0][0] == "source"
        u = unit_of(svc, fake_vllm.instance)
        assert u.stale and dict(u.probability) == before  # kept, not recomputed, not invented
        m = svc.registry
        assert m.get_sample_value("vllm_otel_forecaster_up") == 0.0
        assert m.get_sample_value("vllm_otel_forecaster_data_age_seconds",
                                  {"instance": fake_vllm.instance, "engine": ""}) == pytest.approx(5.0 * k)
        assert m.get_sample_value("vllm_otel_forecaster_prediction_stale",
                                  {"instance": fake_vllm.instance, "engine": ""}) == 1.0
    assert svc.registry.get_sample_value("vllm_otel_forecaster_errors_total", {"stage": "source"}) == 3.0
    code, doc = svc.health()
    assert code == 200 and doc["status"] == "degraded" and doc["stale_instances"] == 1
    # Past the TTL the stale instance is gone from /metrics entirely.
    clock.tick(60)
    svc.run_cycle()
    assert svc.snapshot.units == ()
    assert svc.registry.get_sample_value("vllm_otel_failure_probability",
                                         {"instance": fake_vllm.instance, "engine": "", "model_name": "tiny",
                                          "failure_type": "kv_cache_exhaustion"}) is None
    # No cycle for far longer than the schedule allows: /healthz says so (a liveness probe restarts us).
    clock.tick(120)
    code, doc = svc.health()
    assert code == 503 and doc["status"] == "stalled"


def test_prometheus_refused_and_slow_no_crash_no_prediction() -> None:
    clock = Clock()
    silent = Silent()
    try:
        for url, timeout in ((refused_url(), 2.0), (silent.url, 0.3)):
            svc = ForecasterService(PrometheusSource(url, timeout=timeout, step_s=5), FAST, clock=clock)
            t0 = time.perf_counter()
            for _ in range(2):
                clock.tick()
                rep = svc.run_cycle()
                assert not rep.ok and rep.errors[0][0] == "source"
            assert time.perf_counter() - t0 < 2 * timeout + 2  # bounded by the timeout, no hang
            assert svc.snapshot.units == () and not svc.snapshot.up
            assert svc.registry.get_sample_value("vllm_otel_forecaster_errors_total", {"stage": "source"}) == 2
            assert svc.registry.get_sample_value("vllm_otel_forecaster_up") == 0.0
            svc.stop()
        assert "did not answer within 0.3 s" in rep.errors[0][1]
    finally:
        silent.close()


def test_instance_disappearing_is_stale_then_dropped_after_ttl() -> None:
    a, b = FakeVllm(), FakeVllm()
    clock = Clock()
    svc = ForecasterService(ScrapeSource([a.url, b.url], timeout=1), FAST, clock=clock, instance_ttl_s=30)
    try:
        warm(svc, clock, [a, b], 6)
        assert {u.unit for u in svc.snapshot.units} == {a.instance, b.instance}
        kept = probs(svc, b.instance)
        b.stop()
        for k in range(6):  # 30 s
            a.text = moving(6 + k)
            clock.tick()
            rep = svc.run_cycle()
            assert rep.ok and [s for s, _ in rep.errors] == ["target"]
            assert unit_of(svc, b.instance).stale and probs(svc, b.instance) == kept
            assert not unit_of(svc, a.instance).stale
        a.text = moving(12)
        clock.tick()
        svc.run_cycle()
        assert [u.unit for u in svc.snapshot.units] == [a.instance]
        assert svc.registry.get_sample_value("vllm_otel_forecaster_instances") == 1.0
        assert b.instance not in svc.detector.instances  # the detector forgot it too
        assert svc.registry.get_sample_value("vllm_otel_forecaster_errors_total", {"stage": "target"}) == 7.0
    finally:
        svc.stop()
        a.stop()
        b.stop()


def test_vllm_restart_counter_reset_and_gap(fake_vllm: FakeVllm) -> None:
    clock = Clock()
    svc = ForecasterService(ScrapeSource([fake_vllm.url], timeout=1), FAST, clock=clock)
    warm(svc, clock, [fake_vllm], 8)
    fake_vllm.status = 503  # restarting: /metrics not served
    for _ in range(2):
        clock.tick()
        assert not svc.run_cycle().ok
    assert unit_of(svc, fake_vllm.instance).stale
    # Back, with every counter started over (a new process).
    fake_vllm.status = 200
    fake_vllm.text = moving(0, tokens=40.0, preemptions=0.0)
    clock.tick()
    rep = svc.run_cycle()
    assert rep.ok and rep.gap_steps == 2 and rep.points == 1  # the outage as a gap, then the new point
    res = svc.last_result
    assert res is not None and res.signals["restarted"][res.units.index(fake_vllm.instance)] == 1.0
    u = unit_of(svc, fake_vllm.instance)
    assert not u.stale
    # The reset is not read as -17 preemptions or a flat token counter: no breach from it.
    assert u.source.get("preemption_storm") != "breach" and u.source.get("engine_stall") != "breach"
    assert all(0.0 <= p <= 1.0 for p in u.probability.values())
    warm(svc, clock, [fake_vllm], 5, start=1)
    assert "kv_cache_exhaustion" in probs(svc, fake_vllm.instance)
    assert svc.registry.get_sample_value("vllm_otel_forecaster_errors_total", {"stage": "detector"}) == 0.0


def test_nan_samples_withdraw_only_that_prediction(fake_vllm: FakeVllm) -> None:
    clock = Clock()
    svc = ForecasterService(ScrapeSource([fake_vllm.url], timeout=1), FAST, clock=clock)
    warm(svc, clock, [fake_vllm], 6)
    assert "kv_cache_exhaustion" in probs(svc, fake_vllm.instance)
    for k in range(3):
        fake_vllm.text = moving(6 + k, kv=float("nan"))
        clock.tick()
        assert svc.run_cycle().ok
    p = probs(svc, fake_vllm.instance)
    assert "kv_cache_exhaustion" not in p  # no KV data for 3 steps: no KV prediction
    assert {"engine_stall", "preemption_storm"} <= set(p)  # the rest still predicted
    assert not unit_of(svc, fake_vllm.instance).stale


def test_instance_appearing_later_warms_up_on_its_own() -> None:
    a, b = FakeVllm(), FakeVllm()
    b.status = 503
    clock = Clock()
    svc = ForecasterService(ScrapeSource([a.url, b.url], timeout=1), FAST, clock=clock)
    try:
        warm(svc, clock, [a], 6)
        b.status = 200
        warm(svc, clock, [a, b], 2, start=6)
        assert probs(svc, a.instance) and probs(svc, b.instance) == {}  # b: too little data yet
        warm(svc, clock, [a, b], 3, start=8)
        assert probs(svc, b.instance)
    finally:
        svc.stop()
        a.stop()
        b.stop()


def test_data_parallel_engines_are_separate_units(fake_vllm: FakeVllm) -> None:
    def two_engines(step: int) -> str:
        text = moving(step)
        extra = [re.sub(r'engine="0"', 'engine="1"', line) for line in text.splitlines()
                 if line.startswith("vllm:") and 'engine="0"' in line]
        # engine 1 is idle at 90% KV: a different picture from engine 0
        extra = [re.sub(r"^(vllm:kv_cache_usage_perc\{[^}]*\}) \S+$", r"\g<1> 0.9", x) for x in extra]
        return text + "\n".join(extra) + "\n"

    clock = Clock()
    svc = ForecasterService(ScrapeSource([fake_vllm.url], timeout=1), FAST, clock=clock)
    for k in range(6):
        fake_vllm.text = two_engines(k)
        clock.tick()
        assert svc.run_cycle().ok
    units = {u.unit: u for u in svc.snapshot.units}
    assert set(units) == {f"{fake_vllm.instance}/engine=0", f"{fake_vllm.instance}/engine=1"}
    assert {u.engine for u in units.values()} == {"0", "1"}
    assert {u.instance for u in units.values()} == {fake_vllm.instance}
    e1 = svc.registry.get_sample_value("vllm_otel_forecast", {"instance": fake_vllm.instance, "engine": "1",
                                                              "model_name": "tiny", "signal": "kv_usage",
                                                              "quantile": "0.5"})
    assert e1 == pytest.approx(0.9, abs=0.02)


def test_otlp_push_of_the_same_gauges(fake_vllm: FakeVllm, otlp_receiver, monkeypatch) -> None:  # noqa: ANN001
    from vllm_otel.forecast.publish import OtlpPublisher

    for k, v in otlp_receiver.otel_env("http/protobuf").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "forecaster-under-test")
    clock = Clock()
    svc = ForecasterService(ScrapeSource([fake_vllm.url], timeout=1), FAST, clock=clock)
    warm(svc, clock, [fake_vllm], 6)
    pub = OtlpPublisher(lambda: svc.snapshot, clock)
    try:
        assert pub.flush()
    finally:
        pub.shutdown()
    got = [m for m in otlp_receiver.metrics("vllm_otel_failure_probability")
           if m["resource"].get("service.name") == "forecaster-under-test"]
    kv = [m for m in got if m["attributes"].get("failure_type") == "kv_cache_exhaustion"]
    assert kv and kv[-1]["attributes"]["instance"] == fake_vllm.instance
    assert kv[-1]["value"] == pytest.approx(probs(svc, fake_vllm.instance)["kv_cache_exhaustion"])
    assert otlp_receiver.metrics("vllm_otel_forecaster_up")


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_once_json_and_errors(fake_vllm: FakeVllm, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vllm_otel.cli import main

    cfg = tmp_path / "detector.yaml"
    cfg.write_text("horizon_s: 60\nmin_points: 3\nmin_history_s: 0\n")
    assert main(["forecaster", "--once", "--json", "--scrape", fake_vllm.url, "--config", str(cfg)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "scrape" and doc["up"] and doc["horizon_s"] == 60
    (inst,) = doc["instances"]
    assert inst["instance"] == fake_vllm.instance and inst["model_name"] == "tiny"
    assert set(inst["failures"]) == set(FAILURE_TYPES)

    assert main(["forecaster", "--once", "--json", "--prometheus", refused_url(), "--timeout", "1"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["up"] and doc["instances"] == [] and doc["errors"][0]["stage"] == "source"

    bad = tmp_path / "bad.yaml"
    bad.write_text("horizon_s: -1\n")
    assert main(["forecaster", "--once", "--scrape", fake_vllm.url, "--config", str(bad)]) == 2
    assert "horizon_s" in capsys.readouterr().err
    assert main(["forecaster", "--json", "--scrape", fake_vllm.url]) == 2
    assert main(["forecaster", "--once", "--shard", "3/2"]) == 2
    capsys.readouterr()


def test_cli_service_serves_and_stops_on_sigterm(fake_vllm: FakeVllm) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vllm_otel.cli", "forecaster", "--scrape", fake_vllm.url,
                             "--interval", "0.5", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        m: dict = {}
        while time.monotonic() < deadline:
            try:
                m = scrape(f"http://127.0.0.1:{port}")
                if samples(m, "vllm_otel_forecaster_data_age_seconds"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert samples(m, "vllm_otel_forecaster_up")[()] == 1.0
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["up"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "serving http://127.0.0.1:" in proc.stderr.read()


# -- against the real vLLM and a real Prometheus ---------------------------------------------------

@pytest.mark.vllm
def test_scrape_source_live_vllm(vllm_server) -> None:  # noqa: ANN001
    src = ScrapeSource([vllm_server.url], timeout=10)
    try:
        batch = src.fetch(time.time())
    finally:
        src.close()
    inst = f"127.0.0.1:{vllm_server.port}"
    assert batch.frame.units == [inst] and batch.model_names[inst] == "tiny" and not batch.errors
    for name in ("kv_usage", "running", "waiting", "preemptions", "generation_tokens"):
        assert math.isfinite(batch.frame.values[name][0, 0]), name
    assert "ttft" in batch.frame.histograms


@pytest.mark.vllm
def test_cli_once_json_against_live_vllm(vllm_server) -> None:  # noqa: ANN001
    out = subprocess.run([sys.executable, "-m", "vllm_otel.cli", "forecaster", "--once", "--json",
                          "--scrape", vllm_server.url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["up"] and doc["failure_types"] == list(FAILURE_TYPES)
    (inst,) = doc["instances"]
    assert inst["instance"] == f"127.0.0.1:{vllm_server.port}" and inst["model_name"] == "tiny"
    assert set(inst["failures"]) == set(FAILURE_TYPES)
    for v in inst["failures"].values():
        assert v["probability"] is None or 0.0 <= v["probability"] <= 1.0


@pytest.mark.vllm
@pytest.mark.prometheus
def test_prometheus_source_live_predictions_on_metrics(vllm_server, prometheus) -> None:  # noqa: ANN001
    inst = f"127.0.0.1:{vllm_server.port}"
    for i in range(3):
        vllm_server.complete("tell me about forecasting " * (3 + i), max_tokens=8)
    # Enough 1 s points for the detector's warm-up (a fresh Prometheus may hold only a few).
    prometheus.wait_for(f'count_over_time(vllm:num_requests_running{{instance="{inst}"}}[1m])',
                        lambda r: bool(r) and float(r[0]["value"][1]) >= 10, timeout_s=40)
    src = PrometheusSource(prometheus.url, 'job="vllm"', 5.0, step_s=1.0, backfill_s=120)
    svc = ForecasterService(src, {"min_points": 6, "min_history_s": 0.0}, interval_s=1.0)
    svc.serve(port=0)
    try:
        rep = svc.run_cycle()
        assert rep.ok and rep.points >= 8 and rep.units == 1, rep  # the backfill
        u = unit_of(svc, inst)
        assert u.model_name == "tiny" and not u.stale and u.probability
        assert all(0.0 <= p <= 1.0 for p in u.probability.values())
        time.sleep(1.1)
        rep = svc.run_cycle()  # the next cycle asks only for the new points
        assert rep.ok and 1 <= rep.points <= 3
        m = scrape(svc)
        got = {dict(k)["failure_type"]: v for k, v in samples(m, "vllm_otel_failure_probability").items()
               if dict(k)["instance"] == inst and dict(k)["model_name"] == "tiny"}
        assert "kv_cache_exhaustion" in got and all(0.0 <= v <= 1.0 for v in got.values())
        assert set(got) <= set(FAILURE_TYPES)
        age = samples(m, "vllm_otel_forecaster_data_age_seconds")
        assert 0.0 <= age[(("engine", ""), ("instance", inst))] < 10.0

        # Then Prometheus hangs (the session one cannot be stopped: the source is pointed at a
        # socket that accepts and never answers): same predictions, marked stale, data age grows.
        before = dict(unit_of(svc, inst).probability)
        silent = Silent()
        svc.source = PrometheusSource(silent.url, 'job="vllm"', 0.5, step_s=1.0)
        try:
            time.sleep(1.0)
            rep = svc.run_cycle()
        finally:
            silent.close()
        assert not rep.ok and "did not answer" in rep.errors[0][1]
        m2 = scrape(svc)
        assert samples(m2, "vllm_otel_forecaster_up")[()] == 0.0
        assert samples(m2, "vllm_otel_forecaster_prediction_stale")[(("engine", ""), ("instance", inst))] == 1.0
        assert samples(m2, "vllm_otel_forecaster_data_age_seconds")[(("engine", ""), ("instance", inst))] > \
            age[(("engine", ""), ("instance", inst))] + 1.0
        assert dict(unit_of(svc, inst).probability) == before
    finally:
        svc.stop()


def test_shards_together_publish_exactly_what_one_forecaster_does() -> None:
    """N forecasters with ``--shard K/N`` over the same targets: each publishes predictions only
    for its own instances, none is published twice, and together they cover what one unsharded
    forecaster publishes."""
    servers = [FakeVllm() for _ in range(8)]
    clock = Clock()
    targets = [s.url for s in servers]
    whole = ForecasterService(ScrapeSource(targets, timeout=2), FAST, clock=clock)
    shards = [ForecasterService(ScrapeSource(targets, timeout=2, shard=(k, 3)), FAST, clock=clock)
              for k in (1, 2, 3)]
    try:
        for k in range(10):
            for s in servers:
                s.text = moving(k)
            clock.tick()
            for svc in [whole, *shards]:
                assert svc.run_cycle().ok or not svc.source.targets

        def published(svc: ForecasterService) -> set[str]:
            return {u.unit for u in svc.snapshot.units if u.probability}

        everyone = published(whole)
        assert everyone == {s.instance for s in servers}
        parts = [published(svc) for svc in shards]
        assert sum(len(p) for p in parts) == len(everyone)        # none twice
        assert set().union(*parts) == everyone                     # none lost
        for k, part in enumerate(parts, 1):
            assert all(in_shard(u, (k, 3)) for u in part)
    finally:
        for svc in [whole, *shards]:
            svc.stop()
        for s in servers:
            s.stop()


class _QueryRange:
    """Prometheus' query_range endpoint answering from synthetic series (the fake stands in for
    the answer's size only: a real Prometheus would need a fleet's worth of targets to exceed it)."""

    def __init__(self, instances: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        from vllm_otel.forecast.synthetic import scenario, to_query_range

        self.ranges: list[tuple[float, float]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                start, end, step = float(q["start"]), float(q["end"]), float(q["step"])
                outer.ranges.append((start, end))
                n = int(round((end - start) / step)) + 1
                body = to_query_range({f"10.0.0.{i}:8000": scenario("steady", n, step_s=step, seed=i)
                                       for i in range(instances)}, t0=start, step_s=step)
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading at its size limit, as it should

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_backfill_too_large_for_one_answer_is_shortened_to_fit(caplog: pytest.LogCaptureFixture) -> None:
    """A fleet whose 30 min of history is over the answer limit still starts: the forecaster
    asks for the newest point alone, then for as much history as fits, and says so."""
    prom = _QueryRange(instances=20)
    src = PrometheusSource(prom.url, step_s=5.0, backfill_s=1800, max_bytes=2_000_000)
    try:
        with caplog.at_level("WARNING", logger="vllm_otel.forecast"):
            batch = src.fetch(T0)
        assert not batch.empty and len(batch.frame.units) == 20
        points = len(batch.frame.t)
        assert 2 <= points < 361 and batch.frame.t[-1] == math.floor(T0 / 5.0) * 5.0
        assert "history per query" in caplog.text
        # later fetches catch up one step at a time; an outage is caught up within what fits
        assert len(src.fetch(T0 + 5.0).frame.t) == 1
        assert len(src.fetch(T0 + 3600.0).frame.t) == points
        with pytest.raises(SourceError, match="one point of every series is over 100 bytes"):
            PrometheusSource(prom.url, step_s=5.0, max_bytes=100).fetch(T0)
    finally:
        src.close()
        prom.close()
