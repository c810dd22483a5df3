"""The operators' approvals page, in a real headless browser (Debian's chromium, driven over the
Chrome DevTools protocol): an operator logs in, sees the pending action with its alert, reason,
guards and the learner's confidence, approves it with a note, and the action runs.

Real: the receiver (Starlette app on uvicorn, SQLite store, its worker), the real HTTP actuator
calling the `scale_out` hook of the `scale_resources` strategy on a local HTTP server, chromium.
At the boundary: the metrics source (a static snapshot saying the target's KV cache is 95 % full),
because no vLLM is the target here. Forms are filled and clicked as a user would, through the
DOM; the page itself has no JavaScript.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.receiver_support import OPERATORS, TOKEN, StaticMetrics, am_alert, am_payload
from vllm_otel.mitigate.actuators import build_actuator
from vllm_otel.mitigate.policy import Policy
from vllm_otel.mitigate.receiver import create_app
from vllm_otel.mitigate.strategies.common import KV_USAGE, WAITING
from vllm_otel.mitigate.store import Store
from vllm_otel.testing.processes import free_port
from vllm_otel.testing.services import UvicornThread
from vllm_otel.testing.webhook import WebhookSink

websockets_sync = pytest.importorskip("websockets.sync.client")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh installs it)")
TARGET = "10.0.0.1:8000"


class Browser:
    """One chromium page over the DevTools protocol (JSON over a websocket)."""

    def __init__(self, profile: Path) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                page = next(p for p in pages if p.get("type") == "page")
                break
            except (httpx.HTTPError, StopIteration, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("chromium did not open its DevTools port") from None
                time.sleep(0.2)
        self._conn = websockets_sync.connect(page["webSocketDebuggerUrl"], max_size=1 << 24)
        self.ws = self._conn.__enter__()
        self._ids = itertools.count(1)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return out.get("result", {}).get("value")

    def wait(self, expression: str, timeout_s: float = 20) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.js(f"document.readyState === 'complete' && ({expression})")
            if got:
                return got
            time.sleep(0.1)
        raise AssertionError(f"page never satisfied {expression!r}; at {self.js('location.href')}: "
                             f"{self.js('document.body && document.body.innerText')}")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait(f"location.href.startsWith({json.dumps(url.split('?')[0][:30])})")

    def close(self) -> None:
        try:
            if hasattr(self, "ws"):
                self._conn.__exit__(None, None, None)
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def _receiver(tmp_path: Path, hook_url: str) -> tuple[Any, Store]:
    policy = Policy.from_mapping({
        "targets": [{"instance": TARGET}],
        "rules": [{"alertname": "VllmKvCacheNearlyFull", "strategies": ["scale_resources"]}],
        "strategies": {"scale_resources": {"mode": "approval", "params": {
            "hook": "scale_out", "require_improvement": False, "verify_window_s": 0}},
            "escalate_to_human": {"params": {"url": hook_url}}},
        "actuator": {"hooks": {"scale_out": {"method": "POST", "url": hook_url, "body": {
            "instance": "${instance}", "add_replicas": "${replicas_delta}", "reason": "${alertname}"}}}},
        "worker": {"poll_s": 0.05, "verify_delay_s": 0, "action_timeout_s": 10},
    })
    store = Store(f"sqlite:///{tmp_path / 'ui.db'}")
    app = create_app(policy, store, actuator=build_actuator(policy),
                     metrics_source=StaticMetrics({KV_USAGE: 0.95, WAITING: 3.0}),
                     token=TOKEN, operators=OPERATORS, start_worker=True)
    return app, store


def _actions(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/actions", headers={"Authorization": f"Bearer {OPERATORS['bob']}"},
                     timeout=10).json()["actions"]


def test_an_operator_logs_in_approves_and_the_action_runs(tmp_path: Path, browser: Browser) -> None:
    with WebhookSink(path="/scale") as hook:
        app, store = _receiver(tmp_path, hook.url)
        with UvicornThread(app) as srv:
            r = httpx.post(f"{srv.url}/webhook", json=am_payload(am_alert(instance=TARGET)),
                           headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 202
            deadline = time.monotonic() + 20
            while not [a for a in _actions(srv.url) if a["status"] == "awaiting_approval"]:
                assert time.monotonic() < deadline, _actions(srv.url)
                time.sleep(0.1)
            [act] = _actions(srv.url)

            # Not logged in: the page sends the browser to the login form.
            browser.goto(f"{srv.url}/ui/")
            browser.wait("location.pathname === '/ui/login'")
            # A wrong credential is refused.
            browser.js("document.getElementById('operator').value = 'alice';"
                       "document.getElementById('credential').value = 'not-her-credential';"
                       "document.getElementById('login-button').click(); true")
            browser.wait("document.getElementById('error') !== null")
            # The intake token is no operator credential either.
            browser.goto(f"{srv.url}/ui/login")
            browser.js("document.getElementById('operator').value = 'alice';"
                       f"document.getElementById('credential').value = {json.dumps(TOKEN)};"
                       "document.getElementById('login-button').click(); true")
            browser.wait("document.getElementById('error') !== null")
            # Alice logs in.
            browser.goto(f"{srv.url}/ui/login")
            browser.js("document.getElementById('operator').value = 'alice';"
                       f"document.getElementById('credential').value = {json.dumps(OPERATORS['alice'])};"
                       "document.getElementById('login-button').click(); true")
            browser.wait("document.getElementById('operator') && "
                         "document.getElementById('operator').innerText === 'alice'")
            row = browser.js(f"document.getElementById('action-{act['id']}').innerText")
            assert "VllmKvCacheNearlyFull" in row and TARGET in row and "scale_resources" in row
            assert "kill_switch" in row  # the guards' decisions
            if act["confidence"] is not None:
                assert f"{act['confidence'] * 100:.0f} %" in row
            assert act["why"][:30] in row
            # She approves with a note.
            browser.js(f"const f = document.querySelector('#action-{act['id']} form.approve');"
                       "f.querySelector('textarea').value = 'scaling out, paged by on-call';"
                       "f.querySelector('button[value=approve]').click(); true")
            browser.wait("document.getElementById('message') && "
                         "document.getElementById('message').innerText.includes('approved by alice')")
            # ... and the action runs: the hook receives the call, the audit trail says so.
            got = hook.wait_for(lambda p: p.get("instance") == TARGET, timeout_s=20)
            assert got["add_replicas"] in (1, "1") and got["reason"] == "VllmKvCacheNearlyFull"
            deadline = time.monotonic() + 20
            while True:
                [done] = _actions(srv.url)
                if done["outcome"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert done["outcome"] == "success" and done["timings"]["approved_by"] == "alice"
            browser.goto(f"{srv.url}/ui/")
            audit = browser.wait(f"document.getElementById('audit-{act['id']}') && "
                                 f"document.getElementById('audit-{act['id']}').innerText")
            assert "success" in audit and "alice" in audit
        store.close()


def test_forms_without_the_csrf_token_or_session_are_refused(tmp_path: Path, browser: Browser) -> None:
    """A forged cross-site form (no CSRF token, or another session's) changes nothing."""
    with WebhookSink(path="/scale") as hook:
        app, store = _receiver(tmp_path, hook.url)
        with UvicornThread(app) as srv:
            browser.goto(f"{srv.url}/ui/login")
            browser.js("document.getElementById('operator').value = 'bob';"
                       f"document.getElementById('credential').value = {json.dumps(OPERATORS['bob'])};"
                       "document.getElementById('login-button').click(); true")
            browser.wait("document.getElementById('killswitch') !== null")
            # The browser holds bob's session cookie; a form posted without the token is refused.
            status = browser.js(
                "fetch('/ui/killswitch', {method: 'POST', headers: {'Content-Type': "
                "'application/x-www-form-urlencoded'}, body: 'engaged=true&reason=forged'})"
                ".then(r => r.status)")
            assert status == 403
            assert store.kill_switch().engaged is False
            # With the token from the page, bob engages the kill switch; the trail names him.
            browser.js("document.querySelector('#killswitch input[name=reason]').value = 'drill';"
                       "document.querySelector('#killswitch button').click(); true")
            browser.wait("document.getElementById('message') && "
                         "document.getElementById('message').innerText.includes('engaged by bob')")
            assert store.kill_switch().engaged is True and store.kill_switch().by == "bob"
            # Without a session cookie (another browser), the same form with a token is refused.
            r = httpx.post(f"{srv.url}/ui/killswitch", data={"engaged": "false", "csrf": "x"})
            assert r.status_code == 303 and r.headers["location"] == "/ui/login"
            assert store.kill_switch().engaged is True
        store.close()
