"""Bearer-token set-up shared by the HTTP commands (``vllm-otel receiver``, ``vllm-otel supervise``)."""

from __future__ import annotations

import ipaddress
import sys

__all__ = ["is_loopback", "load_server_token"]


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
