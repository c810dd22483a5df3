"""The ``receiver`` command as a real process serving HTTPS, with the intake token and an
operator credential from files."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.receiver_support import CLI, OP_AUTH, TOKEN, am_alert, am_payload, cli_files
from vllm_otel.testing.processes import free_port


def test_receiver_command_serves_tls_with_a_token_file(tmp_path: Path) -> None:
    """The `receiver` subcommand as a real process: HTTPS, bearer token from a file, SQLite store."""
    import shutil
    import ssl
    import subprocess
    import sys

    from vllm_otel.testing.processes import ManagedProcess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not on PATH: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token_file, policy_file = cli_files(tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    proc = ManagedProcess("receiver", [
        sys.executable, "-c", CLI, "receiver", "--config", str(policy_file), "--port", str(port),
        "--token-file", str(token_file), "--operator", f"alice={tmp_path / 'alice.cred'}",
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--db-url", f"sqlite:///{tmp_path / 'cli.db'}"], tmp_path / "receiver.log")
    with proc, httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=5) as c:
        deadline = time.monotonic() + 20
        while True:
            try:
                if c.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.post(f"{url}/webhook", json=am_payload(am_alert()),
                      headers={"Authorization": "Bearer nope"}).status_code == 403
        assert c.post(f"{url}/webhook", json=am_payload(am_alert()), headers=auth).status_code == 202
        deadline = time.monotonic() + 10
        while True:
            acts = c.get(f"{url}/actions", headers=OP_AUTH).json()["actions"]
            if acts and acts[0]["outcome"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert acts[0]["outcome"] == "dry_run" and acts[0]["strategy"] == "escalate_to_human"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # plain HTTP is not served
    assert TOKEN not in (tmp_path / "cli.db").read_bytes().decode("latin-1")
