"""The operators' approvals page, served by the receiver under ``/ui``.

Server-rendered HTML (Jinja2, autoescaped), no JavaScript: pending actions with their alert, the
policy's reason, the guards' decisions and the learner's confidence, approve or reject with a
note, the recent audit trail and the kill switch.

Operators log in with their name and credential (the same as ``--operator NAME=FILE``); a login
gives a random session id in an HttpOnly, SameSite=Strict cookie (Secure under TLS), kept in this
process's memory for ``SESSION_TTL_S``. Every form carries the session's CSRF token, and the
login form a token bound to a pre-login cookie (double submit), so another site can neither act
with an operator's session nor log a browser in as someone else. What an operator does here goes
through the same :class:`~vllm_otel.mitigate.receiver.Receiver` calls as the API, under their name.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from vllm_otel.mitigate.records import iso
from vllm_otel.mitigate.routes.common import receiver_of
from vllm_otel.mitigate.serve_auth import Credentials

__all__ = ["SessionStore", "PageState", "approvals_routes", "SESSION_COOKIE"]

SESSION_COOKIE = "vllm_otel_session"
LOGIN_COOKIE = "vllm_otel_login"
SESSION_TTL_S = 8 * 3600
FORM_MAX_BYTES = 16 * 1024
_TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
_TEMPLATES.env.filters["iso"] = lambda ts: iso(ts) or "-"


class SessionStore:
    """Logged-in operators: session id -> (operator, CSRF token, expiry). In memory: a restart
    logs everyone out; several replicas each keep their own (log in where you are routed)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, str, float]] = {}

    def create(self, operator: str) -> tuple[str, str]:
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            self._sessions = {k: v for k, v in self._sessions.items() if v[2] > now}
            self._sessions[sid] = (operator, csrf, now + self.ttl_s)
        return sid, csrf

    def get(self, sid: str | None) -> tuple[str, str] | None:
        if not sid:
            return None
        with self._lock:
            got = self._sessions.get(sid)
            if got is None or got[2] <= self.clock():
                self._sessions.pop(sid, None)
                return None
            return got[0], got[1]

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


class PageState:
    """What the page keeps besides the receiver: logged-in sessions, whether its cookies are
    HTTPS-only, and (without credentials, loopback only) the one CSRF token its forms carry, which
    another site cannot read, so a page elsewhere cannot post to this one."""

    def __init__(self, *, secure_cookies: bool = False, sessions: SessionStore | None = None) -> None:
        self.secure_cookies = secure_cookies
        self.sessions = sessions or SessionStore()
        self.open_csrf = secrets.token_urlsafe(32)


def approvals_routes() -> list[Route]:
    """The ``/ui`` routes; they find the :class:`~vllm_otel.mitigate.receiver.Receiver` in
    ``app.state.receiver`` and their :class:`PageState` in ``app.state.approvals``."""
    return [
        Route("/ui", root, methods=["GET"]),
        Route("/ui/", index, methods=["GET"]),
        Route("/ui/login", login_page, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", logout, methods=["POST"]),
        Route("/ui/actions/{action_id:int}/{verb}", act, methods=["POST"]),
        Route("/ui/killswitch", kill_switch, methods=["POST"]),
    ]


def _page(request: Request) -> PageState:
    return request.app.state.approvals


def _cookie(request: Request, resp: Response, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(name, value, max_age=max_age, path="/ui", httponly=True, samesite="strict",
                    secure=_page(request).secure_cookies)


def _current(request: Request) -> tuple[str, str] | None:
    """The logged-in operator and their session's CSRF token, or None."""
    page = _page(request)
    if receiver_of(request).credentials.open:  # loopback without credentials: everyone is the same nobody
        sid = request.cookies.get(SESSION_COOKIE)
        return page.sessions.get(sid) or (Credentials.UNAUTHENTICATED, page.open_csrf)
    return page.sessions.get(request.cookies.get(SESSION_COOKIE))


async def _form(request: Request) -> dict[str, str] | None:
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > FORM_MAX_BYTES:
        return None
    data = await request.form(max_files=0, max_fields=20)
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _back(message: str, status_code: int = 303) -> RedirectResponse:
    return RedirectResponse(f"/ui/?msg={quote(message[:300])}", status_code=status_code)


async def login_page(request: Request) -> Response:
    token = secrets.token_urlsafe(32)
    resp = _TEMPLATES.TemplateResponse(request, "login.html", {
        "csrf": token, "error": request.query_params.get("error", "")[:200]})
    _cookie(request, resp, LOGIN_COOKIE, token, 900)
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def login(request: Request) -> Response:
    data = await _form(request)
    if data is None:
        return Response("form too large", status_code=413)
    if not _same(data.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
        return Response("stale or forged login form: reload the login page", status_code=403)
    creds = receiver_of(request).credentials
    name = data.get("operator", "").strip()
    who = creds.operator_for(data.get("credential", "")) if creds.operators else None
    if who is None or who != name:
        return RedirectResponse("/ui/login?error=" + quote("unknown operator or wrong credential"),
                                status_code=303)
    sid, _ = _page(request).sessions.create(who)
    resp = RedirectResponse("/ui/", status_code=303)
    _cookie(request, resp, SESSION_COOKIE, sid, SESSION_TTL_S)
    resp.delete_cookie(LOGIN_COOKIE, path="/ui")
    return resp


async def logout(request: Request) -> Response:
    who = _current(request)
    data = await _form(request)
    if who is None or data is None or not _same(data.get("csrf"), who[1]):
        return Response("forbidden", status_code=403)
    _page(request).sessions.drop(request.cookies.get(SESSION_COOKIE))
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/ui")
    return resp


async def index(request: Request) -> Response:
    who = _current(request)
    if who is None:
        return RedirectResponse("/ui/login", status_code=303)
    receiver = receiver_of(request)
    rows = await asyncio.to_thread(receiver.store.actions, limit=500)
    pending = [r for r in rows if r.status == "awaiting_approval"]
    kill = await asyncio.to_thread(receiver.kill_switch_state)
    resp = _TEMPLATES.TemplateResponse(request, "approvals.html", {
        "operator": who[0], "csrf": who[1], "pending": pending, "recent": rows[:50],
        "kill": kill, "message": request.query_params.get("msg", "")[:300],
        "replica": receiver.replica_id})
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def _operator_form(request: Request) -> tuple[Any, dict[str, str]] | Response:
    """The logged-in operator and the posted form, or the answer that refuses them (no
    session: to the login page; form too large; CSRF token missing or wrong)."""
    who = _current(request)
    if who is None:
        return RedirectResponse("/ui/login", status_code=303)
    data = await _form(request)
    if data is None:
        return Response("form too large", status_code=413)
    if not _same(data.get("csrf"), who[1]):
        return Response("missing or wrong CSRF token: reload the page", status_code=403)
    return who, data


async def act(request: Request) -> Response:
    checked = await _operator_form(request)
    if isinstance(checked, Response):
        return checked
    who, data = checked
    receiver = receiver_of(request)
    action_id: int = request.path_params["action_id"]
    verb: str = request.path_params["verb"]
    note = data.get("note", "")[:2000]
    if verb == "approve":
        code, out = await asyncio.to_thread(receiver.approve, action_id, who[0], note)
    elif verb == "reject":
        code, out = await asyncio.to_thread(receiver.reject, action_id, who[0], note)
    else:
        return Response("not found", status_code=404)
    if code >= 400:
        return _back(f"action {action_id}: {out.get('detail', code)}")
    return _back(f"action {action_id} {'approved' if verb == 'approve' else 'rejected'} by {who[0]}")


async def kill_switch(request: Request) -> Response:
    checked = await _operator_form(request)
    if isinstance(checked, Response):
        return checked
    who, data = checked
    engaged = data.get("engaged") == "true"
    await asyncio.to_thread(receiver_of(request).set_kill_switch, engaged, who[0],
                            data.get("reason", "")[:2000])
    return _back(f"kill switch {'engaged' if engaged else 'released'} by {who[0]}")


async def root(_: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)
