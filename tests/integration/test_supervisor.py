"""The supervisor: argument patching (pure), a real `vllm-otel supervise` process around a small
real HTTP server (restart with patched arguments, crash restarts with backoff, rollback, only its
own process group signalled), and the compose / Kubernetes command builders. The real vLLM
whose stopped engine core is restarted through the supervisor is in tests/integration/test_closed_loop.py.

There is no Docker engine and no Kubernetes cluster here: the compose and Kubernetes backends are
tested by the exact commands they build (run by a recording runner), nothing more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
import yaml

from vllm_otel.mitigate.supervisor.args import get_arg, health_url_for, patch_args, redact_argv
from vllm_otel.mitigate.supervisor.base import RestartError, RestartRequest, check_allowed
from vllm_otel.mitigate.supervisor.compose import ComposeBackend
from vllm_otel.mitigate.supervisor.kubernetes import KubernetesBackend
from vllm_otel.testing.processes import free_port
from vllm_otel.testing.services import SupervisorProcess

TOKEN = "supervisor-test-token"

# A small real server standing in for vLLM's process tree: it serves /health, reports its argv
# and environment, keeps a helper child in its process group (as vLLM keeps its engine core),
# and can start one that leaves the group. --max-num-seqs 0 makes it fail to start (a bad
# argument); --max-model-len N delays its start by N seconds.
TOY = textwrap.dedent('''
    import http.server, json, os, subprocess, sys, time
    argv = sys.argv[1:]
    def arg(flag):
        return argv[argv.index(flag) + 1] if flag in argv else None
    if arg("--max-num-seqs") == "0":
        sys.exit(3)
    time.sleep(float(arg("--max-model-len") or 0))
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    escaped = None
    if os.environ.get("TOY_ESCAPE"):
        escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                   start_new_session=True)
    info = {"pid": os.getpid(), "helper": helper.pid, "escaped": escaped.pid if escaped else None,
            "argv": argv, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(arg("--port"))), H).serve_forever()
''')


def gone(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(pred: Any, timeout_s: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Supervised(SupervisorProcess):
    """`python -m vllm_otel.mitigate.supervisor.cli ... -- <command>` as a real process."""

    def __init__(self, tmp: Path, command: list[str], *, env: dict[str, str] | None = None,
                 extra: list[str] = (), name: str = "supervise") -> None:
        super().__init__(tmp, command, token=TOKEN, env=env, extra=extra, name=name)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    p = tmp_path / "toy.py"
    p.write_text(TOY)
    return p


@pytest.fixture
def supervised(tmp_path: Path, toy: Path, request: pytest.FixtureRequest) -> Iterator[Supervised]:
    opts = getattr(request, "param", {})
    port = free_port()
    s = Supervised(tmp_path, [sys.executable, str(toy), "--port", str(port), "--gpu-memory-utilization", "0.9"],
                   env=opts.get("env"), extra=["--backoff", "0.3", "--stop-grace", "5", *opts.get("extra", [])])
    s.toy_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    s.start()
    try:
        yield s
    finally:
        s.stop()


def toy_info(s: Supervised) -> dict[str, Any]:
    return httpx.get(s.toy_url, timeout=5).json()  # type: ignore[attr-defined]


# --- pure functions -----------------------------------------------------------------------------------

ARGV = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--enforce-eager",
        "--gpu_memory_utilization", "0.3", "--port=8000", "-tp", "2", "--api-key", "sk-secret"]


@pytest.mark.parametrize("set_args, remove, want", [
    ({"--gpu-memory-utilization": 0.25}, [], ARGV[:6] + ["--gpu-memory-utilization", "0.25"] + ARGV[8:]),
    ({"--enforce-eager": False}, [], ARGV[:5] + ARGV[6:]),
    ({"--enforce-eager": True}, [], ARGV),
    ({"--cpu-offload-gb": 4}, [], ARGV + ["--cpu-offload-gb", "4"]),
    ({"--port": 9000}, [], ARGV[:8] + ["--port", "9000"] + ARGV[9:]),
    ({"--tensor-parallel-size": 1}, [], ARGV[:9] + ["--tensor-parallel-size", "1"] + ARGV[11:]),
    ({}, ["--api-key", "--gpu-memory-utilization"], ARGV[:6] + ARGV[8:11]),
    ({"--disable-custom-all-reduce": True}, ["--no-such-flag"], ARGV + ["--disable-custom-all-reduce"]),
])
def test_patch_args(set_args: dict, remove: list, want: list) -> None:
    before = list(ARGV)
    assert patch_args(ARGV, set_args, remove) == want
    assert ARGV == before  # pure: the input is not modified


def test_patch_args_edge_cases() -> None:
    # An on/off flag followed by a positional keeps the positional.
    assert patch_args(["vllm", "serve", "--enforce-eager", "MODEL"], {"--enforce-eager": None}) == \
        ["vllm", "serve", "MODEL"]
    # Duplicates collapse to the first position; argparse's last-wins value is what get_arg reads.
    assert patch_args(["x", "--a", "1", "--b", "--a", "2"], {"--a": 3}) == ["x", "--a", "3", "--b"]
    assert get_arg(["x", "--a", "1", "--a=2"], "--a") == "2"
    # A negative number is a value, not a flag; the --no- twin goes when the flag is set.
    assert patch_args(["x", "--seed", "-1", "--no-enforce-eager"], {"--enforce-eager": True}) == \
        ["x", "--seed", "-1", "--enforce-eager"]
    # Nothing after a bare "--" is touched; new flags go before it.
    assert patch_args(["x", "--a", "1", "--", "--a", "9"], {"--a": 2, "--c": "z"}) == \
        ["x", "--a", "2", "--c", "z", "--", "--a", "9"]
    with pytest.raises(ValueError):
        patch_args(["x"], {"model": "y"})
    assert get_arg(ARGV, "--tensor_parallel_size") == "2" and get_arg(ARGV, "--enforce-eager") is True
    assert get_arg(ARGV, "--max-num-seqs") is None


def test_redaction_allow_lists_and_health_url() -> None:
    shown = redact_argv(ARGV)
    assert "sk-secret" not in " ".join(shown) and shown[:-1] == ARGV[:-1]
    check_allowed(RestartRequest(set_args={"--enforce-eager": True, "--no-enforce-eager": None},
                                 env={"CUDA_VISIBLE_DEVICES": "1", "NCCL_P2P_DISABLE": "1"}),
                  ["--enforce-eager"], ["CUDA_VISIBLE_DEVICES", "NCCL_*"])
    with pytest.raises(RestartError) as e:
        check_allowed(RestartRequest(set_args={"--model": "x"}, remove_args=["--trust-remote-code"],
                                     env={"LD_PRELOAD": "/x.so", "BAD NAME": "1"}),
                      ["--enforce-eager"], ["NCCL_*"])
    assert e.value.status == 400
    for word in ("--model", "--trust-remote-code", "LD_PRELOAD", "BAD NAME"):
        assert word in str(e.value)
    assert health_url_for(["vllm", "serve", "m"]) == "http://127.0.0.1:8000/health"
    assert health_url_for(["x", "--host", "0.0.0.0", "--port", "9"]) == "http://127.0.0.1:9/health"
    assert health_url_for(["x", "--host", "::1", "--port=9"]) == "http://[::1]:9/health"


# --- a real supervisor process --------------------------------------------------------------------------

def test_api_needs_the_token_but_healthz(supervised: Supervised) -> None:
    assert httpx.get(f"{supervised.url}/healthz").status_code == 200
    assert httpx.get(f"{supervised.url}/status").status_code == 401
    assert httpx.post(f"{supervised.url}/restart", json={},
                      headers={"Authorization": "Bearer nope"}).status_code == 403
    st = supervised.status()
    assert st["state"] == "running" and st["pid"] == toy_info(supervised)["pid"]
    assert st["restarts"] == 0 and "--gpu-memory-utilization" in st["argv"]


def test_restart_with_patched_arguments(supervised: Supervised) -> None:
    old = toy_info(supervised)
    out = supervised.client.restart(RestartRequest(
        drain=False, set_args={"--gpu-memory-utilization": 0.8, "--enforce-eager": True},
        env={"CUDA_VISIBLE_DEVICES": "1"}, reason="test"))
    assert out["ok"] and out["old_pid"] == old["pid"] and out["new_pid"] != old["pid"]
    assert out["start_s"] > 0 and out["total_s"] >= out["start_s"]
    new = toy_info(supervised)
    assert new["pid"] == out["new_pid"] and new["cuda"] == "1"
    assert get_arg(new["argv"], "--gpu-memory-utilization") == "0.8" and "--enforce-eager" in new["argv"]
    st = supervised.status()
    assert st["restarts"] == 1 and st["env"] == {"CUDA_VISIBLE_DEVICES": "1"} and st["last_restart"]["ok"]
    assert gone(old["pid"]) and gone(old["helper"])  # the whole old group went
    # No drain asked: said so. Drain asked without vLLM's control endpoint: said why, restarted anyway.
    assert out["drain"]["detail"] == "not asked"
    out = supervised.client.restart(RestartRequest(drain=True))
    assert out["ok"] and out["drain"]["drained"] is False and "control" in out["drain"]["detail"]
    # Changes are kept across restarts.
    assert get_arg(toy_info(supervised)["argv"], "--gpu-memory-utilization") == "0.8"


def test_refuses_what_is_not_allowed_and_a_second_restart(supervised: Supervised) -> None:
    with pytest.raises(RestartError) as e:
        supervised.client.restart(RestartRequest(set_args={"--model": "/other"}))
    assert e.value.status == 400 and "allow-list" in str(e.value)
    slow = threading.Thread(target=supervised.client.restart,
                            args=(RestartRequest(drain=False, set_args={"--max-model-len": 2}),))
    slow.start()
    time.sleep(0.8)
    with pytest.raises(RestartError) as e:
        supervised.client.restart(RestartRequest(drain=False))
    assert e.value.status == 409
    slow.join(30)
    assert supervised.status()["restarts"] == 1


def test_arguments_that_do_not_come_up_are_rolled_back(supervised: Supervised) -> None:
    with pytest.raises(RestartError) as e:
        supervised.client.restart(RestartRequest(drain=False, set_args={"--max-num-seqs": 0}))
    assert e.value.status == 502 and "rolled back" in str(e.value)
    assert e.value.data["rolled_back"] is True and "exited with code 3" in e.value.data["error"]
    info = toy_info(supervised)
    assert get_arg(info["argv"], "--max-num-seqs") is None
    st = supervised.status()
    assert st["state"] == "running" and st["restarts"] == 0 and st["last_restart"]["ok"] is False


@pytest.mark.parametrize("supervised", [{"extra": ["--max-restarts", "2", "--restart-window", "60"]}],
                         indirect=True)
def test_crash_restarts_with_backoff_then_gives_up(supervised: Supervised) -> None:
    delays = []
    for n in (1, 2):
        pid = supervised.status()["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # the child we (through the supervisor) started
        new = wait_until(lambda: (s := supervised.status())["pid"] not in (None, pid) and s, 20, "a new pid")
        delays.append(time.monotonic() - t0)
        assert new["auto_restarts"] == n and new["last_exit_code"] == -signal.SIGKILL
        wait_until(lambda: supervised.status()["state"] == "running", 20, "running again")
        assert toy_info(supervised)["pid"] == new["pid"]
    assert delays[0] >= 0.3 and delays[1] >= 0.6, delays  # 0.3 s, then doubled
    os.kill(supervised.status()["pid"], signal.SIGKILL)
    st = wait_until(lambda: (s := supervised.status())["state"] == "failed" and s, 20, "failed")
    assert st["pid"] is None and st["auto_restarts"] == 2
    # A human (or a strategy) can still start it again.
    out = supervised.client.restart(RestartRequest(drain=False))
    assert out["ok"] and supervised.status()["state"] == "running"


@pytest.mark.parametrize("supervised", [{"env": {"TOY_ESCAPE": "1"}}], indirect=True)
def test_only_its_own_process_group_is_signalled(supervised: Supervised) -> None:
    info = toy_info(supervised)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        out = supervised.client.restart(RestartRequest(drain=False))
        assert out["ok"]
        assert gone(info["pid"]) and gone(info["helper"])          # its group: stopped
        assert not gone(info["escaped"]) and not gone(sibling.pid)  # not its group: untouched
        assert os.getpgid(out["new_pid"]) == out["new_pid"]         # a new group of its own
        assert os.getpgid(out["new_pid"]) != os.getpgid(supervised.proc.pid)
    finally:
        for pid in (info["escaped"], sibling.pid):
            if pid and not gone(pid):
                os.kill(pid, signal.SIGKILL)
        sibling.wait()
        escaped_new = toy_info(supervised)["escaped"]
        if escaped_new and not gone(escaped_new):
            os.kill(escaped_new, signal.SIGKILL)


def test_sigterm_of_the_supervisor_stops_vllm(tmp_path: Path, toy: Path) -> None:
    s = Supervised(tmp_path, [sys.executable, str(toy), "--port", str(free_port())]).start()
    pid = s.status()["pid"]
    s.stop()
    assert wait_until(lambda: gone(pid), 10, "the child to stop")


def test_cli_refuses_unsafe_setups(tmp_path: Path) -> None:
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vllm_otel.mitigate.supervisor.cli", *argv],
                              capture_output=True, text=True, timeout=60)

    assert "after `--`" in cli("--allow-unauthenticated").stderr
    assert "--token-file is required" in cli("--", "true").stderr
    assert "refusing" in cli("--allow-unauthenticated", "--listen", "0.0.0.0:1", "--", "true").stderr


# --- compose and Kubernetes: the commands they build --------------------------------------------------------

class Runner:
    """Records commands instead of running docker / kubectl (neither exists here)."""

    def __init__(self, stdout: dict[str, str]) -> None:
        self.stdout = stdout
        self.commands: list[list[str]] = []

    def __call__(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        assert "shell" not in kw and isinstance(cmd, list)
        self.commands.append(cmd)
        key = next((k for k in self.stdout if k in cmd), None)
        return subprocess.CompletedProcess(cmd, 0, self.stdout.get(key, ""), "")


def test_compose_backend_builds_an_override_and_recreates_the_service(tmp_path: Path) -> None:
    config = {"services": {"vllm": {"command": ["--model", "/m", "--gpu-memory-utilization", "0.9"],
                                    "environment": {"HF_TOKEN": "hf_x", "NCCL_DEBUG": "WARN"}}}}
    run = Runner({"config": json.dumps(config)})
    b = ComposeBackend(tmp_path, "vllm", files=["compose.yaml"], runner=run)
    out = b.restart(RestartRequest(drain=False, set_args={"--enforce-eager": True},
                                   env={"CUDA_VISIBLE_DEVICES": "0"}))
    override = tmp_path / "vllm-otel.vllm.override.yml"
    base = ["docker", "compose", "--project-directory", str(tmp_path), "-f", "compose.yaml"]
    assert run.commands == [base + ["config", "--format", "json"],
                            base + ["-f", str(override), "up", "-d", "--no-deps", "--force-recreate", "vllm"]]
    doc = yaml.safe_load(override.read_text())["services"]["vllm"]
    assert doc["command"] == ["--model", "/m", "--gpu-memory-utilization", "0.9", "--enforce-eager"]
    assert doc["environment"] == {"HF_TOKEN": "hf_x", "NCCL_DEBUG": "WARN", "CUDA_VISIBLE_DEVICES": "0"}
    assert out["ok"] and out["commands"] == run.commands[1:]
    # Later calls read the merged config (the override included); no change: a plain restart.
    run.commands.clear()
    b.restart(RestartRequest(drain=False))
    assert run.commands == [base + ["-f", str(override), "restart", "vllm"]]
    assert b.status()["env"] == {"NCCL_DEBUG": "WARN"}  # allow-listed variables only: no HF_TOKEN
    with pytest.raises(RestartError, match="no command"):
        b.plan({"services": {"vllm": {"image": "vllm/vllm-openai"}}}, RestartRequest(set_args={"--enforce-eager": True}))


def test_kubernetes_backend_patches_the_deployment_and_waits_for_the_rollout() -> None:
    dep = {"spec": {"template": {"spec": {"containers": [
        {"name": "sidecar", "args": ["x"]},
        {"name": "vllm", "args": ["--model", "/m", "--tensor-parallel-size", "4"],
         "env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0,1,2,3"}, {"name": "HF_TOKEN", "value": "hf_x"}]}]}}},
        "status": {"replicas": 1, "readyReplicas": 1}}
    run = Runner({"get": json.dumps(dep)})
    b = KubernetesBackend("llm", "vllm", container="vllm", context="prod", runner=run, timeout_s=600)
    b.restart(RestartRequest(set_args={"--tensor-parallel-size": 2}, env={"CUDA_VISIBLE_DEVICES": "0,1"}))
    base = ["kubectl", "--context", "prod", "-n", "llm"]
    get, patch, wait = run.commands
    assert get == base + ["get", "deployment", "vllm", "-o", "json"]
    assert patch[:-1] == base + ["patch", "deployment", "vllm", "--type=json", "-p"]
    assert json.loads(patch[-1]) == [
        {"op": "replace", "path": "/spec/template/spec/containers/1/args",
         "value": ["--model", "/m", "--tensor-parallel-size", "2"]},
        {"op": "replace", "path": "/spec/template/spec/containers/1/env",
         "value": [{"name": "HF_TOKEN", "value": "hf_x"}, {"name": "CUDA_VISIBLE_DEVICES", "value": "0,1"}]}]
    assert wait == base + ["rollout", "status", "deployment/vllm", "--timeout=600s"]
    run.commands.clear()
    b.restart(RestartRequest())
    assert run.commands[0] == base + ["rollout", "restart", "deployment/vllm"]
    st = b.status()
    assert st["env"] == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"} and st["ready_replicas"] == 1
    with pytest.raises(RestartError) as e:
        b.restart(RestartRequest(set_args={"--model": "/other"}))
    assert e.value.status == 400
