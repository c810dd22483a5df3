"""Credentials of the HTTP commands (``vllm-otel receiver``, ``vllm-otel supervise``): bearer
tokens from files, and the receiver's two roles (intake, operators)."""

from __future__ import annotations

import hmac
import ipaddress
import re
import sys
from typing import Mapping, Sequence

__all__ = ["Credentials", "bearer", "is_loopback", "load_operators", "load_server_token"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_server_token(prog: str, token_file: str | None, allow_unauthenticated: bool,
                      host: str) -> tuple[str | None, bool]:
    """``(token, ok)``: the token from ``token_file``; None without one, which is allowed only
    with ``allow_unauthenticated`` on a loopback address. ``ok`` False: the reason is printed
    to stderr and the command should exit 2."""
    def fail(msg: str) -> tuple[None, bool]:
        print(f"{prog}: {msg}", file=sys.stderr)
        return None, False

    if token_file:
        try:
            token = open(token_file, encoding="utf-8").read().strip()
        except OSError as e:
            return fail(f"cannot read --token-file: {e}")
        if not token:
            return fail(f"{token_file} is empty")
        return token, True
    if not allow_unauthenticated:
        return fail("--token-file is required (or --allow-unauthenticated on loopback)")
    if not is_loopback(host):
        return fail(f"refusing to listen on {host} without a token")
    return None, True


# --- the receiver's two roles ---------------------------------------------------------------------

_OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class Credentials:
    """Who may do what on the receiver.

    * the intake token (``--token-file``): POST /webhook only, what Alertmanager holds;
    * operator credentials (``--operator NAME=FILE``, several): the audit trail, approve, reject,
      the kill switch and the approvals page. The audit trail names the operator whose credential
      was presented, never what a request body claims.

    ``intake`` None and no operators: nothing is checked (loopback only, ``--allow-unauthenticated``);
    the audit trail then says ``unauthenticated``.
    """

    UNAUTHENTICATED = "unauthenticated"

    def __init__(self, intake: str | None = None, operators: Mapping[str, str] | None = None) -> None:
        self.intake = intake
        self.operators = dict(operators or {})
        for name, secret in self.operators.items():
            if not _OPERATOR_NAME.fullmatch(name):
                raise ValueError(f"bad operator name {name!r}: letters, digits, _.@- (max 64)")
            if not secret:
                raise ValueError(f"operator {name}: empty credential")
            if intake is not None and hmac.compare_digest(secret.encode(), intake.encode()):
                raise ValueError(f"operator {name}: credential equals the intake token; the roles "
                                 "need different secrets")

    @property
    def open(self) -> bool:
        return self.intake is None and not self.operators

    def is_intake(self, secret: str) -> bool:
        return self.intake is not None and hmac.compare_digest(secret.encode(), self.intake.encode())

    def operator_for(self, secret: str) -> str | None:
        """The operator holding ``secret``; every credential is compared (no early exit)."""
        found = None
        for name, cred in self.operators.items():
            if hmac.compare_digest(secret.encode(), cred.encode()) and found is None:
                found = name
        return found


def bearer(header: str | None) -> tuple[str | None, str | None]:
    """``(credential, problem)`` from an Authorization header."""
    if not header:
        return None, "missing bearer token"
    scheme, _, cred = header.partition(" ")
    if scheme.lower() != "bearer" or not cred.strip():
        return None, "expected 'Authorization: Bearer <token>'"
    return cred.strip(), None


def load_operators(prog: str, specs: Sequence[str] | None) -> tuple[dict[str, str], bool]:
    """``--operator NAME=FILE`` (repeatable) -> ``({name: credential}, ok)``; problems to stderr."""
    out: dict[str, str] = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            print(f"{prog}: --operator wants NAME=FILE, got {spec!r}", file=sys.stderr)
            return {}, False
        if not _OPERATOR_NAME.fullmatch(name) or name == Credentials.UNAUTHENTICATED:
            print(f"{prog}: bad operator name {name!r} (letters, digits, _.@-; max 64)", file=sys.stderr)
            return {}, False
        if name in out:
            print(f"{prog}: operator {name} given twice", file=sys.stderr)
            return {}, False
        try:
            secret = open(path, encoding="utf-8").read().strip()  # noqa: SIM115
        except OSError as e:
            print(f"{prog}: cannot read the credential of operator {name}: {e}", file=sys.stderr)
            return {}, False
        if len(secret) < 16:
            print(f"{prog}: operator {name}: credential in {path} is shorter than 16 characters",
                  file=sys.stderr)
            return {}, False
        out[name] = secret
    return out, True
