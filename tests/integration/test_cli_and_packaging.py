"""The CLI answers --help everywhere, and the package imports on a host without vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs Python with `import vllm` made impossible, the way a host without vLLM behaves.
_NO_VLLM = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _NO_VLLM + code, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


COMMANDS = ("tiny-model", "replay", "backtest", "forecaster", "demo", "receiver", "supervise", "dashboards",
            "check", "status", "plugins", "learner")


def test_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "vllm_otel", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_subcommand_has_help(cmd):
    r = subprocess.run([sys.executable, "-m", "vllm_otel", cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: vllm-otel {cmd} ")


def test_a_command_loads_only_its_own_module():
    """`vllm-otel receiver` (restarted while Alertmanager retries) does not import the other
    commands' modules: replay's numpy, tiny-model's test services."""
    r = _run("""
from vllm_otel.cli import main
try:
    main(['-v', 'receiver', '--help'])
except SystemExit as e:
    assert e.code == 0
for mod in ('numpy', 'vllm_otel.loadgen', 'vllm_otel.testing', 'vllm_otel.demo'):
    assert mod not in sys.modules, mod
""")
    assert r.returncode == 0, r.stderr


def test_import_and_tools_work_without_vllm():
    r = _run("""
import vllm_otel, vllm_otel.config, vllm_otel.loadgen.traces, vllm_otel.testing
from vllm_otel.cli import main
assert "vllm" not in sys.modules
print(vllm_otel.__version__)
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == __import__("vllm_otel").__version__


def test_vllm_commands_fail_clearly_without_vllm():
    r = _run("from vllm_otel.cli import main; sys.exit(main(['demo']))")
    assert r.returncode == 2
    assert "pip install 'vllm-otel[cpu]'" in r.stderr


def test_tiny_model_json_output(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "vllm_otel", "tiny-model", str(out), "--json",
                        "--max-position-embeddings", "4096"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["directory"] == str(out)
    cfg = json.loads((out / "config.json").read_text())
    # vLLM's CPU attention needs head_dim >= 64
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 64
    assert cfg["max_position_embeddings"] == 4096
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "chat_template.jinja").is_file() or "chat_template" in tok
