"""`vllm-otel demo` run for real: every service of the loop on this machine, the exit status, the
summary, the series dump replayed by `vllm-otel backtest`, and the report opened in a real headless
browser (Debian's chromium). Then Ctrl-C in the middle of a run: nothing it started is left.

Nothing is faked. The demo starts its own vLLM (under `vllm-otel supervise`), Prometheus,
Alertmanager, forecaster, receiver and OTLP receiver; the test gives it a model folder of its own
so that every process it starts names a path of this test, which is how "nothing left running"
is checked (never by process name).

Run alone: ``flock /tmp/vllm-otel-heavy.lock .venv/bin/python -m pytest tests/integration/test_demo.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.prometheus, pytest.mark.alertmanager]


def _procs_naming(*paths: Path) -> list[str]:
    """Processes on this machine whose command line names one of ``paths`` (our own runs only)."""
    keys = [str(p) for p in paths]
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if p.pid != os.getpid() and any(k in cmd for k in keys):
            found.append(f"{p.pid}: {cmd[:160]}")
    return found


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    from vllm_otel.demo import _small_model

    # A copy under this test's own folder: its path appears in vLLM's command line.
    model = tmp_path_factory.mktemp("demo-model") / "model"
    shutil.copytree(_small_model(), model)
    return model


def _demo(args: list[str], **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen([sys.executable, "-m", "vllm_otel", "demo", "--no-live", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def _run_once(model: Path, out: Path) -> dict:
    proc = _demo(["--json", "--model", str(model), "--report-dir", str(out), "--duration", "420"])
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.communicate(timeout=120)
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "dir": out, "model": model}


# A forecast is a probability: on a busy 2-core machine a burst can fill the queue a second before
# the live forecaster's alarm (README, "What the demo shows": one run in four). Such a run is a
# real, reported miss (exit 1, `not_closed_because`); the test then runs the demo once more and
# requires that one to close. Any other reason fails at once.
LATE = "no failure was predicted before it happened"


@pytest.fixture(scope="module")
def demo_run(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = _run_once(demo_model, tmp_path_factory.mktemp("demo") / "report")
    summary = json.loads((run["dir"] / "summary.json").read_text()) if (run["dir"] / "summary.json").is_file() else {}
    if run["rc"] == 1 and summary.get("not_closed_because") == LATE:
        print(f"first demo run: {LATE} (failure_onsets {summary.get('failure_onsets')}); running it again")
        run = _run_once(demo_model, tmp_path_factory.mktemp("demo-again") / "report")
    return run


@pytest.mark.timeout(900)
def test_the_demo_closes_the_loop_and_says_so(demo_run: dict) -> None:
    """Exit 0, and summary.json shows each step of the loop at a real time, in order."""
    assert demo_run["rc"] == 0, demo_run["stderr"][-4000:]
    summary = json.loads((demo_run["dir"] / "summary.json").read_text())
    printed = json.loads(demo_run["stdout"])  # --json: the same summary on stdout, for scripts
    assert printed["loop_closed"] == summary["loop_closed"] and printed["report_dir"] == str(demo_run["dir"])
    assert summary["loop_closed"] is True and summary["not_closed_because"] is None
    st = summary["steps"]
    pred, fail = st["predicted"], st["failure"]
    assert pred["probability"] >= 0.7 and pred["failure_type"] in ("queue_overload", "ttft_slo_breach",
                                                                    "kv_cache_exhaustion")
    # Predicted before the failure, or the failure never came (prevented).
    assert fail["prevented"] or pred["at"] < fail["at"]
    ramp = next(p for p in summary["phases"] if p["phase"] == "ramp")
    assert ramp["start"] <= pred["at"] <= ramp["end"]
    assert pred["at"] <= st["alert_received"]["at"] <= st["action_started"]["at"] <= st["verified"]["at"]
    assert st["learner_recorded"]["at"] >= st["verified"]["at"] - 1
    assert st["action_started"]["strategy"] == st["learner_recorded"]["strategy"]
    stall = st["stall"]
    assert stall["sigstop_at"] < stall["detected_at"] < stall["restart_finished_at"] < stall["serving_again_at"]
    assert stall["outcome"] == "success" and st["served_throughout"] is True
    lat = summary["latency"]
    assert 0 <= lat["prediction_to_alert_s"] < 60 and 0 < lat["alert_to_verified_s"] < 120
    assert summary["requests"]["ok"] > 50 and summary["otlp"]["spans"] > 0
    assert not _procs_naming(demo_run["dir"], demo_run["model"]), "the demo left processes running"


@pytest.mark.timeout(300)
def test_the_series_dump_replays_through_the_backtest(demo_run: dict) -> None:
    series = demo_run["dir"] / "series.json"
    r = subprocess.run([sys.executable, "-m", "vllm_otel", "backtest", str(series), "--score", "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    score = json.loads(r.stdout)
    assert score  # scored: the dump has the vLLM series the detector reads


@pytest.mark.timeout(300)
def test_the_report_page_draws_its_plots_in_a_real_browser(demo_run: dict, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium not on PATH: run scripts/setup.sh")
    page = (demo_run["dir"] / "report.html").resolve()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "The loop closed" in dom
    assert dom.count('<figure class="plot">') == 7 and dom.count("<svg") >= 7
    assert dom.count("<path") > 100  # lines, axes, ticks: drawn, not empty frames
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1100,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20) or []
    non_white = sum(n for n, c in colours if sum(c) < 720)
    assert len(colours) > 50 and non_white > 0.05 * img.width * img.height, "the page is blank"


@pytest.mark.timeout(720)
def test_ctrl_c_stops_every_process_the_demo_started(demo_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = _demo(["--model", str(demo_model), "--report-dir", str(out)])
    try:
        deadline = time.monotonic() + 300
        log = out / "services" / "supervise.log"
        while time.monotonic() < deadline:  # until vLLM serves, with every service up
            if log.is_file() and "Application startup complete" in log.read_text(errors="replace"):
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(1)
        else:
            pytest.fail("vLLM never came up under the demo")
        assert _procs_naming(out, demo_model), "the demo's services are not running"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        # Stopping five services (vLLM's shutdown above all) takes minutes on a loaded 2-core host.
        _, err = proc.communicate(timeout=300)
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 130, err[-3000:]  # an interrupt, wherever it lands, ends as an interrupt
    deadline = time.monotonic() + 30
    while _procs_naming(out, demo_model) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _procs_naming(out, demo_model), "left running after Ctrl-C"
