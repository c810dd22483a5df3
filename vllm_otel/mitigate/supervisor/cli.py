"""``vllm-otel supervise -- <vllm command...>``: own a vLLM process and restart it on request.

The supervisor (:class:`vllm_otel.mitigate.supervisor.process.ProcessBackend`) starts the command in its
own process group, restarts it when it dies, and serves a small HTTP API for the mitigation
receiver's restart strategies:

- ``GET /healthz``: 200 while the supervisor runs (no token; says nothing about vLLM);
- ``GET /status``: state, pid, arguments (secrets redacted), allow-listed environment,
  restart counts, the last restart;
- ``POST /restart``: JSON :class:`~vllm_otel.mitigate.supervisor.base.RestartRequest` (``drain``,
  ``set_args``, ``remove_args``, ``env``, ``rollback``, ``reason``); answers when the new process
  is healthy, with its pid and timings; 400 bad request or argument not on the allow-list,
  409 a restart is already running, 502 the new process did not come up (rolled back or not).

Every route but ``/healthz`` needs ``Authorization: Bearer <token>`` (``--token-file``).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from pydantic import ValidationError

from vllm_otel.mitigate.serve_auth import load_server_token

__all__ = ["add_parser", "run", "make_server", "main"]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9300"
MAX_BODY = 64 * 1024


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vllm_otel.mitigate.supervisor.base import DEFAULT_ALLOWED_ARGS, DEFAULT_ALLOWED_ENV

    p = sub.add_parser(
        "supervise", help="run vLLM under a supervisor that restarts it (with changed arguments)",
        description="Start the command after `--` in its own process group, restart it when it "
                    "dies (backoff, at most --max-restarts per --restart-window), and restart it "
                    "gracefully on POST /restart (drain, stop, start with patched arguments, wait "
                    "for /health). See docs/supervisor.md.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT of the API (default %(default)s)")
    p.add_argument("--token-file", help="file holding the bearer token API clients must send")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="run the API without a token (only on a loopback address)")
    p.add_argument("--drain-timeout", type=float, default=120.0, metavar="S",
                   help="longest wait for in-flight requests before a restart (default %(default)s)")
    p.add_argument("--stop-grace", type=float, default=30.0, metavar="S",
                   help="SIGTERM to SIGKILL (default %(default)s)")
    p.add_argument("--start-timeout", type=float, default=600.0, metavar="S",
                   help="longest wait for /health after a start (default %(default)s)")
    p.add_argument("--health-url", help="default: http://<--host or 127.0.0.1>:<--port or 8000>/health")
    p.add_argument("--control-token-file",
                   help="vLLM's control token, for draining (default: the command's "
                        "VLLM_OTEL_CONTROL_TOKEN_FILE)")
    p.add_argument("--max-restarts", type=int, default=5, help="crash restarts allowed ... (default %(default)s)")
    p.add_argument("--restart-window", type=float, default=600.0, metavar="S",
                   help="... within this window, then give up (default %(default)s)")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S",
                   help="first crash-restart delay, doubled each time (default %(default)s)")
    p.add_argument("--backoff-max", type=float, default=60.0, metavar="S", help="(default %(default)s)")
    p.add_argument("--allow-arg", action="append", default=[], metavar="FLAG",
                   help=f"another argument POST /restart may change (built in: {' '.join(DEFAULT_ALLOWED_ARGS)})")
    p.add_argument("--allow-env", action="append", default=[], metavar="NAME",
                   help=f"another environment variable (glob) it may change (built in: {' '.join(DEFAULT_ALLOWED_ENV)})")
    p.add_argument("--prestartup-check", action=argparse.BooleanOptionalAction, default=None,
                   help="run the pre-startup check on the command first and refuse to start on "
                        "errors (default: VLLM_MONITOR_PRESTARTUP_CHECK / monitor_config.json)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the vLLM command line")
    p.set_defaults(func=run)


def make_server(backend: Any, host: str, port: int, token: str | None) -> ThreadingHTTPServer:
    """The API around ``backend`` (a RestartBackend); serve with ``serve_forever()``."""
    from vllm_otel.mitigate.supervisor.base import RestartError, RestartRequest

    class Handler(BaseHTTPRequestHandler):
        # Request/response on loopback: Nagle would add ~40 ms to every answer.
        disable_nagle_algorithm = True
        server_version = "vllm-otel-supervise"
        sys_version = ""

        def log_message(self, fmt: str, *args: Any) -> None:  # noqa: D401 - quiet access log
            log.debug("supervise api: " + fmt, *args)

        def _send(self, code: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _authorized(self) -> bool:
            if token is None:
                return True
            auth = self.headers.get("Authorization", "")
            if not auth.lower().startswith("bearer "):
                self._send(401, {"error": "bearer token required"})
                return False
            if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
                self._send(403, {"error": "wrong token"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/healthz":
                self._send(200, {"ok": True})
            elif self.path == "/status":
                if self._authorized():
                    self._send(200, backend.status())
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/restart":
                self._send(404, {"error": "not found"})
                return
            if not self._authorized():
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._send(413, {"error": "body too large"})
                return
            try:
                raw = self.rfile.read(length) if length else b"{}"
                req = RestartRequest.model_validate(json.loads(raw or b"{}"))
            except (ValueError, ValidationError) as e:
                self._send(400, {"error": f"bad restart request: {e}"})
                return
            try:
                self._send(200, backend.restart(req))
            except RestartError as e:
                self._send(e.status, {"error": str(e), "data": e.data})
            except Exception as e:  # noqa: BLE001 - answer, never kill the supervisor
                log.exception("restart failed")
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def run(args: argparse.Namespace) -> int:
    from vllm_otel.mitigate.supervisor.base import DEFAULT_ALLOWED_ARGS, DEFAULT_ALLOWED_ENV, RestartError
    from vllm_otel.mitigate.supervisor.process import ProcessBackend

    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("vllm-otel supervise: give the vLLM command after `--`", file=sys.stderr)
        return 2
    host, _, port_s = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_s)
    except ValueError:
        print(f"vllm-otel supervise: --listen wants HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    token, ok = load_server_token("vllm-otel supervise", args.token_file, args.allow_unauthenticated, host)
    if not ok:
        return 2
    from vllm_otel.config import ConfigError, load_config

    try:
        cfg = load_config(overrides={"prestartup_check": args.prestartup_check})
    except ConfigError as e:
        print(f"vllm-otel supervise: {e}", file=sys.stderr)
        return 2
    if cfg.prestartup_check:
        from vllm_otel.prestartup_check import check_before_start

        if not check_before_start(command, "vllm-otel supervise"):
            print("vllm-otel supervise: the pre-startup check found errors (see above); not starting "
                  f"{command[0]}", file=sys.stderr)
            return 2

    backend = ProcessBackend(
        command, health_url=args.health_url, control_token_file=args.control_token_file,
        drain_timeout_s=args.drain_timeout, stop_grace_s=args.stop_grace,
        start_timeout_s=args.start_timeout, max_restarts=args.max_restarts,
        restart_window_s=args.restart_window, backoff_s=args.backoff, backoff_max_s=args.backoff_max,
        allowed_args=(*DEFAULT_ALLOWED_ARGS, *args.allow_arg),
        allowed_env=(*DEFAULT_ALLOWED_ENV, *args.allow_env))
    try:
        server = make_server(backend, host, port, token)
    except OSError as e:
        print(f"vllm-otel supervise: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        backend.start()
    except (OSError, RestartError) as e:
        print(f"vllm-otel supervise: cannot start {command[0]}: {e}", file=sys.stderr)
        server.server_close()
        return 1
    log.warning("supervise: API on http://%s:%d (pid %s)", host, port, backend.pid)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        backend.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_otel.mitigate.supervisor.cli ...`` (same as ``vllm-otel supervise ...``)."""
    parser = argparse.ArgumentParser(prog="vllm-otel")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["supervise", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
