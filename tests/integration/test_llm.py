"""vllm_otel.llm: offline use of real vLLM with monitoring: the spec's LLM(..., enable_monitoring=True),
llm.get_monitoring_status(), and spans over OTLP/HTTP from an offline process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.vllm]

SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":  # vLLM spawns workers: the guard is required
        from vllm import SamplingParams
        from vllm_otel import LLM
        llm = LLM(model=sys.argv[1], enable_monitoring=True, dtype="float32", enforce_eager=True,
                  max_model_len=1024, gpu_memory_utilization=0.3)
        llm.generate(["Hello, world!", "The quick brown fox", "abc"],
                     SamplingParams(max_tokens=8, ignore_eos=True))
        print("STATUS " + json.dumps(llm.get_monitoring_status()), flush=True)
""")


def test_offline_llm_with_enable_monitoring(tiny_model, otlp_receiver, tmp_path):
    pytest.importorskip("vllm")
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    env = {**os.environ, **otlp_receiver.otel_env("http/protobuf"), "VLLM_CPU_KVCACHE_SPACE": "1",
           "OTEL_SERVICE_NAME": "offline-batch"}
    env.pop("VLLM_ENABLE_MONITORING", None)  # the keyword alone must be enough
    r = subprocess.run([sys.executable, str(script), str(tiny_model)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("STATUS "))
    status = json.loads(line[len("STATUS "):])
    assert status["enabled"] is True
    assert status["engines"]["0"]["finished_requests"] == {"length": 3}
    # ready once LLMEngine is built (no HTTP server offline), idle/serving from the next tick
    assert status["engines"]["0"]["lifecycle_state"] in {"ready", "idle", "serving"}
    # The process flushed its spans over OTLP/HTTP on exit.
    spans = otlp_receiver.wait_for_spans(lambda s: s["resource"].get("service.name") == "offline-batch"
                                         and s["name"].startswith("text_completion"), count=3, timeout_s=30)
    assert all(s["transport"] == "http" for s in spans)


def test_server_accepts_enable_monitoring_flag():
    pytest.importorskip("vllm")
    r = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--help"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0
    assert "--enable-monitoring" in r.stdout
