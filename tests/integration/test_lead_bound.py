"""benchmarks/lead_bound.py: the hindsight bound finds a series that leads a failure, and says so
when none does (the tool behind benchmarks/README.md's statement that no threshold rule meets
the KV targets on the seven recordings made before the warm-start change)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


def _recording(path: Path, shift: int = 0) -> None:
    """600 s at 1 s: two KV exhaustions (200-215 s, 450-465 s, plus ``shift``) that jump from 0.1
    in one scrape, each preceded by 60 s of prompt-token throughput ten times the usual."""
    t = np.arange(600) - shift
    kv = np.where(((t >= 200) & (t <= 215)) | ((t >= 450) & (t <= 465)), 0.99, 0.1)
    busy = ((t >= 140) & (t <= 215)) | ((t >= 390) & (t <= 465))
    prompt = np.cumsum(np.where(busy, 1000.0, 100.0))
    series = {"vllm:kv_cache_usage_perc": kv, "vllm:prompt_tokens_total": prompt,
              "vllm:num_requests_running": np.ones(600), "vllm:num_requests_waiting": np.zeros(600),
              "vllm:generation_tokens_total": np.cumsum(np.full(600, 50.0)),
              "vllm:request_success_total": np.cumsum(np.ones(600))}
    result = [{"metric": {"__name__": name, "instance": "a:8000", "model_name": "m"},
               "values": [[T0 + float(k), repr(float(v))] for k, v in enumerate(vals)]}
              for name, vals in series.items()]
    path.write_text(json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}}))


def test_the_bound_finds_the_leading_series_and_its_lead(tmp_path: Path) -> None:
    _recording(tmp_path / "ramp.json")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lead_bound.py"), "--dir", str(tmp_path),
                          "--json"], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout)
    assert report["recordings"] == ["ramp"]
    kv = report["failures"]["kv_cache_exhaustion"]
    assert kv["detector"]["events"] == 2
    # The throughput rose 60 s before each onset; its 10 s rate first shows it a second later.
    lead = kv["features"]["prompt_tps"]["best"]
    assert lead["recall"] == 1.0 and lead["precision"] == 1.0
    assert 55 <= lead["lead"] <= 60
    assert 100 < lead["level"] < 1000
    # The cache itself jumps in one scrape: no level of it warns before the onset.
    assert kv["features"]["kv_usage_now"]["best"] is None
    assert kv["features"]["kv_usage"]["best"] is None
    assert "queue_overload" not in report["failures"]   # nothing ever waited


def test_the_learned_model_is_scored_out_of_sample(tmp_path: Path) -> None:
    """--learned: a logistic regression on all features, fitted for each recording on the others,
    finds the same warning in a recording it was not fitted on."""
    _recording(tmp_path / "a.json")
    _recording(tmp_path / "b.json", shift=40)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lead_bound.py"), "--dir", str(tmp_path),
                          "--learned", "60", "--json"], capture_output=True, text=True, timeout=300, check=True)
    learned = json.loads(out.stdout)["failures"]["kv_cache_exhaustion"]["learned"]
    assert learned["window_s"] == 60
    hit = learned["best"]
    assert hit["recall"] == 1.0 and hit["precision"] == 1.0
    assert 30 <= hit["lead"] <= 60


def test_holding_out_the_whole_scenario_leaves_its_copies_out_of_the_fit(tmp_path: Path) -> None:
    """--holdout scenario: a recording is scored by a model fitted only on recordings of other
    scenarios, so a near copy of it cannot teach the model its answer."""
    for name, scenario, shift in (("a", "x", 0), ("b", "x", 40), ("c", "x_slow", 20)):
        _recording(tmp_path / f"{name}.json", shift=shift)
        (tmp_path / f"{name}.meta.json").write_text(json.dumps({"scenario": scenario}))

    def run() -> dict:
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lead_bound.py"), "--dir", str(tmp_path),
                              "--learned", "60", "--holdout", "scenario", "--json"],
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout)["failures"]["kv_cache_exhaustion"]["learned"]

    # One scenario (x_slow is x's slow variant): nothing is left to fit on, so nothing warns.
    alone = run()
    assert alone["holdout"] == "scenario" and alone["scored_recordings"] == 0
    assert alone["best"] is None and all(row["recall"] == 0.0 for row in alone["fixed"])
    # A second scenario to learn from: each is scored by the model of the other.
    (tmp_path / "c.meta.json").write_text(json.dumps({"scenario": "y"}))
    other = run()
    assert other["scored_recordings"] == 3
    assert other["best"]["recall"] == 1.0 and 30 <= other["best"]["lead"] <= 60
