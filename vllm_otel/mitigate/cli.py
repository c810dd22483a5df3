"""``vllm-otel receiver``: run the mitigation receiver (Alertmanager webhook -> guarded actions)."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import socket
import sys
from typing import Any

from vllm_otel.mitigate.serve_auth import load_operators, load_server_token

__all__ = ["add_parser", "run"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9095  # next to Alertmanager's 9093/9094


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "receiver", help="Alertmanager webhook receiver: guarded, verified mitigation of vLLM",
        description="Receive Alertmanager webhooks (payload version 4) on POST /webhook, persist "
                    "every alert, and act on vLLM in the background as the policy allows. "
                    "GET /actions is the audit trail, /ui the operators' approvals page, /metrics "
                    "and /healthz the receiver's health. Two roles: the intake token "
                    "(--token-file) only delivers webhooks; operators (--operator) read the audit "
                    "trail, approve, reject and hold the kill switch.")
    p.add_argument("--config", required=True, help="policy file, YAML or JSON (see examples/policy.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port (default %(default)s)")
    p.add_argument("--token-file", help="file holding the intake token: the bearer token Alertmanager "
                                        "sends with webhooks (http_config.authorization.credentials_file); "
                                        "it reaches POST /webhook and nothing else")
    p.add_argument("--operator", action="append", metavar="NAME=FILE",
                   help="an operator and the file holding their credential (16+ characters; repeat "
                        "for each operator). Operators read the audit trail, approve, reject, hold "
                        "the kill switch and log in to /ui; the audit trail records their NAME")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="run without a token (only on a loopback address)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="... and this private key (PEM)")
    p.add_argument("--db-url", help="SQLAlchemy URL of the store; default: the policy's store_url, "
                                    "else sqlite:///vllm-otel-receiver.sqlite3. Use "
                                    "postgresql://... for several replicas")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest webhook body (default 1 MiB)")
    p.add_argument("--replica-id", help="name of this replica in the audit trail (default host:pid)")
    p.add_argument("--no-worker", action="store_true",
                   help="only receive and store alerts; act on nothing (another replica sharing "
                        "the PostgreSQL store does the work)")
    p.add_argument("--reuse-port", action="store_true",
                   help="listen with SO_REUSEPORT (Linux), so that a new receiver on the same port "
                        "and store can start before the old one stops: a rolling restart, with no "
                        "gap in which Alertmanager's deliveries are refused and pile up as retries")
    p.add_argument("--plugin-dir", default=None,
                   help="directory of plugin files (collectors, strategies...), hot-reloaded "
                        "(default: plugin_directory of monitor_config.json / VLLM_MONITOR_PLUGIN_DIRECTORY)")
    p.add_argument("--check-config", action="store_true", help="validate the policy and exit")
    p.set_defaults(func=run)


def _hook(policy: Any, factory: str) -> Any:
    """The real actuator / metrics source come from vllm_otel.mitigate.actuators when present."""
    try:
        mod = importlib.import_module("vllm_otel.mitigate.actuators")
        return getattr(mod, factory)(policy)
    except (ImportError, AttributeError) as e:
        log.warning("%s unavailable (%s)", factory, e)
        return None


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, not yet listening: uvicorn listens on it after the
    app's start-up, so a receiver that is still starting gets none of the connections the kernel
    spreads over the receivers sharing the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _plugins(args: argparse.Namespace, holder: dict[str, Any]) -> Any:
    """The plugin manager for --plugin-dir / plugin_directory, loaded; None without a directory."""
    from vllm_otel.config import load_config

    directory = load_config(overrides={"plugin_directory": args.plugin_dir}).plugin_directory
    if not directory:
        return None
    from vllm_otel.mitigate.plugin_hooks import make_plugin_manager

    manager = make_plugin_manager(directory, holder)
    for src, err in manager.load_all().items():
        log.warning("plugin %s not loaded: %s", src, err)
    return manager


def run(args: argparse.Namespace) -> int:
    from vllm_otel.mitigate.policy import PolicyError, load_policy
    from vllm_otel.mitigate.receiver import DEFAULT_MAX_BODY_BYTES, create_app
    from vllm_otel.mitigate.strategies import UnavailableActuator
    from vllm_otel.mitigate.store import DEFAULT_DB_URL, Store

    plugins, holder = None, {}
    try:
        plugins = _plugins(args, holder)
    except ValueError as e:  # ConfigError, PluginError
        print(f"vllm-otel receiver: {e}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.config)  # after the plugins: the policy may name plugin strategies
    except PolicyError as e:
        print(f"vllm-otel receiver: {e}", file=sys.stderr)
        return 2
    holder["policy"] = policy
    if args.check_config:
        cfg = policy.config
        print(f"{args.config}: OK: {len(cfg.rules)} rules, {len(policy.strategy_names())} strategies, "
              f"{len(cfg.targets)} targets, default mode {cfg.default_mode.value}"
              + (f", {len(plugins.plugins)} plugins" if plugins else ""))
        return 0
    token, ok = load_server_token("vllm-otel receiver", args.token_file, args.allow_unauthenticated, args.host)
    if not ok:
        return 2
    operators, ok = load_operators("vllm-otel receiver", args.operator)
    if not ok:
        return 2
    if token is not None and token in operators.values():
        print("vllm-otel receiver: an operator credential equals the intake token; the roles need "
              "different secrets", file=sys.stderr)
        return 2
    if token is not None and not operators:
        log.warning("no --operator given: approvals, the audit trail and the kill switch are "
                    "refused to everyone (the intake token only delivers webhooks)")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("vllm-otel receiver: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    sockets = None
    if args.reuse_port:
        if not hasattr(socket, "SO_REUSEPORT"):
            print("vllm-otel receiver: --reuse-port needs SO_REUSEPORT (Linux, BSD)", file=sys.stderr)
            return 2
        try:
            sockets = [_reuse_port_socket(args.host, args.port)]
        except OSError as e:  # e.g. the port is held by a receiver started without --reuse-port
            print(f"vllm-otel receiver: cannot listen on {args.host}:{args.port} with SO_REUSEPORT: {e}",
                  file=sys.stderr)
            return 2

    import uvicorn

    store = Store(args.db_url or policy.config.store_url or DEFAULT_DB_URL, replica_id=args.replica_id)
    actuator = _hook(policy, "build_actuator") or UnavailableActuator(
        "no actuator installed (vllm_otel.mitigate.actuators.build_actuator)")
    app = create_app(policy, store, actuator=actuator,
                     metrics_source=_hook(policy, "build_metrics_source"), token=token,
                     operators=operators, secure_cookies=bool(args.tls_cert),
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, close_store=True,
                     start_worker=not args.no_worker)
    # The webhook intake and the worker share this process's GIL. A thread that wants it waits up
    # to the switch interval for whoever holds it (5 ms by default, per hand-over; a webhook takes
    # three: loop -> group-commit writer -> loop). 1 ms keeps the worker's CPU from adding up to
    # ~15 ms to a POST; the price is more frequent switching, only while threads contend.
    sys.setswitchinterval(0.001)
    config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.tls_cert,
                            ssl_keyfile=args.tls_key, log_level="info", server_header=False,
                            access_log=False)
    server = uvicorn.Server(config)
    # Everything imported and built so far lives as long as the process. A full collection walks
    # it all (~94,000 objects, ~50 ms on the 2-core VM, during which no webhook is answered);
    # frozen, the collector leaves it alone and only walks what serving allocates. No
    # gc.collect() first: start-up leaves ~30 unreachable objects, and the collection cost
    # 80-100 ms of a restart's gap (the time Alertmanager's notifications are refused).
    if plugins is not None:
        plugins.publish_to(app.state.receiver.metrics.registry)
        plugins.start()
    gc.freeze()
    try:
        server.run(sockets=sockets)
    finally:
        if plugins is not None:
            plugins.stop()
    if not server.started:  # start-up failed (port taken, app start-up error): uvicorn logged why
        return 3
    return 0
