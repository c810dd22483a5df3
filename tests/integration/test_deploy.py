"""The compose stack, the Kubernetes manifests and the systemd units, checked offline.

No Docker engine or Kubernetes cluster runs here. What is real: check-jsonschema's vendored
compose-spec schema, promtool, systemd-analyze, our own CLI parser (every vllm-otel command line
in the deployment files must parse), and the cross-references between files, which are what breaks
when one file is edited and another is not.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_otel.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
ALERT_CFG = yaml.safe_load((ROOT / "alerts" / "config.yml").read_text())
JOBS = {ALERT_CFG["selectors"][k] for k in ("vllm_job", "forecaster_job", "receiver_job")}


def _tool(name: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(exe).exists():
        pytest.fail(f"{name} not found: run scripts/setup.sh")
    return exe


def _parse_vllm_otel(argv: list[str]) -> Any:
    """A vllm-otel command line from a deployment file, parsed by the real CLI parser."""
    assert argv[0].endswith("vllm-otel"), argv
    args = argv[1:]
    try:
        return build_parser(args[0]).parse_args(args)
    except SystemExit:
        pytest.fail(f"does not parse: {shlex.join(argv)}")


# --- compose ------------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def _hosts() -> dict[str, str]:
    """Every name a container can be reached by -> its service."""
    out = {name: name for name in SERVICES}
    for name, svc in SERVICES.items():
        for alias in (svc.get("networks") or {}).get("default", {}).get("aliases", []):
            out[alias] = name
    return out


def _binds(svc: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts."""
    out = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            out[dst] = (COMPOSE_DIR / src).resolve()
    return out


def _listen_ports(name: str) -> set[int]:
    svc = SERVICES[name]
    ports = {int(p.split(":")[-1]) for p in svc.get("ports", [])}
    cmd = svc.get("command", [])
    for flag, val in zip(cmd, cmd[1:]):
        if flag == "--port":
            ports.add(int(val))
        if flag == "--listen":
            ports.add(int(val.rsplit(":", 1)[1]))
    if name == "otel-collector":
        col = yaml.safe_load((COMPOSE_DIR / "otel-collector" / "config.yaml").read_text())
        ports.add(int(col["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]))
    return ports


def test_compose_file_follows_the_compose_spec():
    r = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                        str(COMPOSE_DIR / "compose.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_images_are_pinned_and_vllm_has_a_gpu_and_a_cpu_profile():
    for name, svc in SERVICES.items():
        image = svc.get("image") or svc["build"]["args"]["BASE"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: {image}"
        base = (svc.get("build") or {}).get("args", {}).get("BASE")
        if base:
            assert not base.endswith(":latest") and ":" in base
    assert SERVICES["vllm-gpu"]["profiles"] == ["gpu"] and SERVICES["vllm-cpu"]["profiles"] == ["cpu"]
    assert SERVICES["vllm-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("vllm-gpu", "vllm-cpu"):
        env = SERVICES[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert "vllm" in SERVICES[name]["networks"]["default"]["aliases"]
        assert (COMPOSE_DIR / SERVICES[name]["build"]["context"] / SERVICES[name]["build"]["dockerfile"]).is_file()


def test_compose_mounts_exist_and_depends_on_is_consistent():
    named = set(COMPOSE.get("volumes", {}))
    for name, svc in SERVICES.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE_DIR / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in named, f"{name}: volume {src} not declared"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy: it has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert "restart" not in SERVICES[dep]
    # every long-running service of ours is health-checked
    for name in ("vllm-gpu", "vllm-cpu", "vllm-otel-forecaster", "vllm-otel-receiver", "prometheus",
                 "alertmanager", "grafana"):
        assert "healthcheck" in SERVICES[name], name


def test_compose_prometheus_config_checks_and_scrapes_what_runs(tmp_path):
    binds = _binds(SERVICES["prometheus"])
    cfg = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    # promtool on a copy whose rule path points where compose mounts it from: the real rules
    rules_dir = next(host for c, host in binds.items() if cfg["rule_files"][0].startswith(c + "/"))
    cfg["rule_files"] = [str(rules_dir / Path(cfg["rule_files"][0]).name)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    found = re.search(r"(\d+) rule files found", r.stdout)
    assert found and int(found.group(1)) == len(list(rules_dir.glob("*.rules.yml"))) >= 6, r.stdout
    hosts = _hosts()
    jobs = {}
    for sc in cfg["scrape_configs"]:
        jobs[sc["job_name"]] = sc
        for tgt in sc["static_configs"][0]["targets"]:
            host, port = tgt.rsplit(":", 1)
            if host == "127.0.0.1":
                continue
            assert host in hosts, f"job {sc['job_name']}: no service {host}"
            assert int(port) in _listen_ports(hosts[host]) | {8000}, f"{tgt}: {hosts[host]} does not listen there"
    assert JOBS <= set(jobs), "job names are the alert rules' selectors (alerts/config.yml)"
    assert jobs[ALERT_CFG["selectors"]["forecaster_job"]]["honor_labels"] is True
    am = cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
    assert am.split(":")[0] in SERVICES and int(am.split(":")[1]) in _listen_ports("alertmanager")


def test_compose_grafana_provisioning_matches_prometheus_and_the_dashboards():
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    ds = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    p = next(d for d in ds["datasources"] if d["type"] == "prometheus")
    assert p["uid"] == "prometheus" and p["isDefault"] is True
    assert p["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    assert p["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/vllm-otel.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    binds = _binds(SERVICES["grafana"])
    assert binds[path] == (ROOT / "dashboards").resolve()
    assert len(list((ROOT / "dashboards").glob("*.json"))) == 4
    assert "/etc/grafana/provisioning" in binds


def test_compose_alertmanager_reaches_the_receiver_with_the_shared_token():
    am = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    hook = next(r for r in am["receivers"] if r["name"] == "vllm-otel-receiver")["webhook_configs"][0]
    host, port = re.match(r"http://([\w-]+):(\d+)/", hook["url"]).groups()
    assert host in SERVICES and int(port) in _listen_ports(host)
    cred = Path(hook["http_config"]["authorization"]["credentials_file"])
    # the token file is in a volume mounted by Alertmanager, the receiver and the init job alike
    am_mount = next(v for v in SERVICES["alertmanager"]["volumes"] if v.split(":")[1] == str(cred.parent))
    vol = am_mount.split(":")[0]
    rx = SERVICES["vllm-otel-receiver"]
    rx_dir = next(v.split(":")[1] for v in rx["volumes"] if v.split(":")[0] == vol)
    args = _parse_vllm_otel(rx["command"])
    assert args.token_file == f"{rx_dir}/{cred.name}"
    init = SERVICES["token-init"]
    init_dir = next(v.split(":")[1] for v in init["volumes"] if v.split(":")[0] == vol)
    assert f"{init_dir}/{cred.name}" in init["command"][-1]


def test_compose_collector_pipelines_are_wired():
    col = yaml.safe_load((COMPOSE_DIR / "otel-collector" / "config.yaml").read_text())
    for name, pipe in col["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipe.get(kind, []):
                assert comp in col[kind], f"pipeline {name}: {kind[:-1]} {comp} is not defined"
    assert set(col["service"]["extensions"]) <= set(col["extensions"])
    jaeger = col["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0]
    assert jaeger in SERVICES
    grpc = col["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    assert SERVICES["vllm-gpu"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(f"otel-collector:{grpc}")
    assert f"{grpc}:{grpc}" in SERVICES["otel-collector"]["ports"]


def test_compose_vllm_otel_commands_parse_and_the_policy_loads(capsys):
    from vllm_otel.cli import main

    _parse_vllm_otel(SERVICES["vllm-otel-forecaster"]["command"])
    _parse_vllm_otel(SERVICES["vllm-otel-receiver"]["command"])
    assert main(["receiver", "--config", str(COMPOSE_DIR / "receiver" / "policy.yaml"), "--check-config"]) == 0
    assert main(["receiver", "--config", str(K8S / "policy.yaml"), "--check-config"]) == 0


# --- Kubernetes -----------------------------------------------------------------------------------------

KUST = yaml.safe_load((K8S / "kustomization.yaml").read_text())
DOCS = [d for f in KUST["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def _workloads() -> list[dict[str, Any]]:
    return _kind("Deployment") + _kind("StatefulSet")


def test_kustomization_resources_exist_and_every_document_is_well_formed():
    for f in KUST["resources"]:
        assert (K8S / f).is_file(), f
    for g in KUST["configMapGenerator"]:
        for f in g["files"]:
            assert (K8S / f).is_file(), f
    for d in DOCS:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
    names = [(d["kind"], d["metadata"]["name"]) for d in DOCS]
    assert len(names) == len(set(names))
    assert {"Deployment", "StatefulSet", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap",
            "AlertmanagerConfig", "Namespace"} <= {d["kind"] for d in DOCS}


def test_services_select_pods_and_name_their_ports():
    for svc in _kind("Service"):
        sel = svc["spec"]["selector"]
        pods = [w for w in _workloads() if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        container_ports = {p["name"] for w in pods for c in w["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port.get("targetPort", port["name"]) in container_ports | {port["port"]}
    for w in _workloads():
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


def test_service_monitors_scrape_the_services_under_the_alerts_job_names():
    services = {s["metadata"]["name"]: s for s in _kind("Service")}
    monitored = set()
    for sm in _kind("ServiceMonitor"):
        match = [s for s in services.values()
                 if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
                 and "clusterIP" not in s["spec"]]
        assert len(match) == 1, sm["metadata"]["name"]
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in {p["name"] for p in match[0]["spec"]["ports"]}
        monitored.add(match[0]["metadata"]["name"])
        if match[0]["metadata"]["name"] == ALERT_CFG["selectors"]["forecaster_job"]:
            assert all(ep.get("honorLabels") is True for ep in sm["spec"]["endpoints"])
    # the Operator names the job after the Service
    assert monitored == JOBS


def test_forecaster_statefulset_shards_by_ordinal():
    sts = _kind("StatefulSet")[0]
    headless = next(s for s in _kind("Service") if s["metadata"]["name"] == sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    c = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["SHARDS"]) == sts["spec"]["replicas"]
    script = c["args"][0]
    assert '--shard "$(( ${HOSTNAME##*-} + 1 ))/$SHARDS"' in script
    # what the shell makes of it for pod ordinal 1 of 2, parsed by the real CLI
    r = subprocess.run(["sh", "-c", "echo " + script.replace("exec vllm-otel", "vllm-otel")],
                       env={"HOSTNAME": f"{sts['metadata']['name']}-1", "SHARDS": env["SHARDS"],
                            "PROMETHEUS_URL": env["PROMETHEUS_URL"]}, capture_output=True, text=True)
    args = _parse_vllm_otel(shlex.split(r.stdout))
    assert args.shard == "2/2" and args.prometheus == env["PROMETHEUS_URL"]


def test_receiver_replicas_share_postgresql_and_the_alertmanager_route_reaches_them():
    dep = next(d for d in _kind("Deployment") if d["metadata"]["name"] == "vllm-otel-receiver")
    assert dep["spec"]["replicas"] >= 2
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = _parse_vllm_otel(c["args"])
    assert args.db_url == "$(DB_URL)"
    db = next(e for e in c["env"] if e["name"] == "DB_URL")["valueFrom"]["secretKeyRef"]
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    token_vol = vols[mounts[str(Path(args.token_file).parent)]]["secret"]
    assert token_vol["secretName"] == db["name"]
    assert vols[mounts[str(Path(args.config).parent)]]["configMap"]["name"] == KUST["configMapGenerator"][0]["name"]
    amc = _kind("AlertmanagerConfig")[0]
    hook = amc["spec"]["receivers"][0]["webhookConfigs"][0]
    assert hook["httpConfig"]["authorization"]["credentials"] == {"name": db["name"], "key": token_vol["items"][0]["key"]}
    svc, ns, port = re.match(r"http://([\w-]+)\.([\w-]+)\.svc:(\d+)/webhook$", hook["url"]).groups()
    assert ns == KUST["namespace"] and svc == dep["metadata"]["name"] and int(port) == args.port
    assert amc["spec"]["route"]["receiver"] == "vllm-otel-receiver"


def test_prometheus_rule_holds_exactly_the_rules_of_alerts(tmp_path):
    pr = _kind("PrometheusRule")[0]
    expected = [g for f in sorted((ROOT / "alerts").glob("*.rules.yml")) for g in yaml.safe_load(f.read_text())["groups"]]
    assert pr["spec"]["groups"] == expected
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}))
    r = subprocess.run([_tool("promtool"), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar():
    cms = [c for c in _kind("ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    shipped = {name: json.loads(text) for c in cms for name, text in c["data"].items()}
    on_disk = {f.name: json.loads(f.read_text()) for f in (ROOT / "dashboards").glob("*.json")}
    assert shipped == on_disk and len(shipped) == 4


def test_vllm_deployment_carries_the_plugin_settings():
    dep = next(d for d in _kind("Deployment") if d["metadata"]["name"] == "vllm")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OTEL_SERVICE_NAME"] and env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    assert float(env["VLLM_MONITOR_STALL_TIMEOUT_S"]) > 0
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "nvidia.com/gpu" in c["resources"]["limits"]


# --- systemd --------------------------------------------------------------------------------------------

UNITS = sorted(SYSTEMD.glob("*.service"))


def _exec(unit: Path, key: str) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(key + "="))
    return shlex.split(line.split("=", 1)[1])


def test_three_units():
    assert [u.name for u in UNITS] == ["vllm-otel-forecaster.service", "vllm-otel-receiver.service", "vllm.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit: Path, tmp_path):
    """With the install path pointed at this environment's vllm-otel, so the executables exist."""
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.fail("systemd-analyze not found")
    venv_bin = str(Path(sys.executable).parent) + "/"
    if not (Path(venv_bin) / "vllm-otel").exists():
        pytest.fail("vllm-otel is not installed next to this Python")
    (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/vllm-otel/venv/bin/", venv_bin))
    r = subprocess.run([exe, "verify", "--man=no", str(tmp_path / unit.name)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_command_lines_parse(unit: Path):
    argv = [a.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/x").replace("${PROMETHEUS_URL}", "http://p:9090")
            .replace("${MODEL}", "m") for a in _exec(unit, "ExecStart")]
    args = _parse_vllm_otel(argv)
    if unit.name == "vllm.service":
        assert args.command[args.command.index("--") + 1 if "--" in args.command else 0].endswith("vllm")
        assert "LoadCredential=supervise-token:" in unit.read_text()
    if unit.name == "vllm-otel-receiver.service":
        assert args.token_file.startswith("/run/credentials/") and "LoadCredential=receiver-token:" in unit.read_text()
