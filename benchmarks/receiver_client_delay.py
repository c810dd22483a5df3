"""How much of ``receiver_load.py``'s POST->202 time is the load generator's own delay?

The load generator is Python on the same two CPUs as the receiver. When the host is slow, its
event loop may read an answer late, and the measured time would then include the client. This
script sends the same open-loop stream (Alertmanager v4, one new alert each, keep-alive
connections, no restart) to a real ``vllm-otel receiver`` and times every request twice:

* *user*: from just before sending to the moment the client has read the whole answer (what
  ``receiver_load.py`` reports);
* *socket*: from the same start to the kernel's receive timestamp of the answer's first bytes
  (``SO_TIMESTAMPNS`` on the client's socket), which does not depend on when the client got
  round to reading it.

The difference between the two is the client's own read delay.

    .venv/bin/python benchmarks/receiver_client_delay.py --rate 200 --seconds 20 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from receiver_load import TOKEN, payload, request_bytes, start_receiver, write_policy

from vllm_otel.testing.processes import free_port

SO_TIMESTAMPNS = 35  # Linux (asm-generic); the socket module has no name for it
SCM_TIMESTAMPNS = SO_TIMESTAMPNS


class Closed(Exception):
    """The server closed a kept-alive connection before answering (its keep-alive timeout)."""


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, float | None]:
    """One read, with the kernel's receive time (CLOCK_REALTIME, s) of its first bytes."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, 256)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), lambda f=ready: f.done() or f.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        stamp = None
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", raw[:16])
                stamp = sec + nsec * 1e-9
        return data, stamp


def _complete(buf: bytes) -> bool:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = 0
    for line in buf[:end].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    return len(buf) >= end + 4 + length


async def _connect(loop: asyncio.AbstractEventLoop, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's streams do
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _exchange(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> tuple[bytes, float]:
    await loop.sock_sendall(sock, data)
    buf, first = b"", None
    while not _complete(buf):
        chunk, stamp = await _recv(loop, sock)
        if not chunk:
            raise Closed if not buf else ConnectionError("connection closed mid-answer")
        buf += chunk
        first = first or stamp
    if first is None:
        raise RuntimeError("no receive timestamp: SO_TIMESTAMPNS unsupported here")
    return buf, first


async def drive(port: int, rate: float, seconds: float) -> list[tuple[float, float]]:
    """(user ms, socket ms) per request."""
    loop = asyncio.get_running_loop()
    starts_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    total = int(rate * seconds)
    bodies = [request_bytes(port, json.dumps(payload(i, starts_at)).encode()) for i in range(total)]
    idle: list[socket.socket] = []
    out: list[tuple[float, float]] = []

    async def one(i: int) -> None:
        t0, r0 = time.perf_counter(), time.time()
        while True:
            sock = idle.pop() if idle else await _connect(loop, port)
            try:
                head, stamp = await _exchange(loop, sock, bodies[i])
                break
            except Closed:
                sock.close()  # like Go's client: send again on a fresh connection
        if b" 202 " not in head[:20]:
            raise SystemExit(f"alert {i}: {head[:200]!r}")
        out.append(((time.perf_counter() - t0) * 1e3, (stamp - r0) * 1e3))
        idle.append(sock)

    t_start, tasks = time.perf_counter(), []
    for i in range(total):
        delay = t_start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for s in idle:
        s.close()
    return out


def _q(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rate", type=float, default=200.0, help="alerts per second (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()  # as receiver_load.py's client
    except ImportError:
        pass
    runs = []
    for _ in range(args.repeat):
        wd = Path(tempfile.mkdtemp(prefix="vllm-otel-client-delay-"))
        (wd / "token").write_text(TOKEN)
        write_policy(wd)
        port = free_port()
        proc = start_receiver(wd, port, 0, [])
        try:
            res = asyncio.run(drive(port, args.rate, args.seconds))
        finally:
            proc.stop()
        user, sock = sorted(u for u, _ in res), sorted(s for _, s in res)
        diff = sorted(u - s for u, s in res)
        runs.append({"n": len(res), "user_p50_ms": _q(user, 0.5), "user_p99_ms": _q(user, 0.99),
                     "user_max_ms": user[-1], "socket_p50_ms": _q(sock, 0.5), "socket_p99_ms": _q(sock, 0.99),
                     "socket_max_ms": sock[-1], "read_delay_p50_ms": _q(diff, 0.5),
                     "read_delay_p99_ms": _q(diff, 0.99), "user_over_20ms": sum(x > 20 for x in user),
                     "socket_over_20ms": sum(x > 20 for x in sock)})
    if args.json:
        print(json.dumps(runs))
        return 0
    for r in runs:
        print(f"n={r['n']}  user p50 {r['user_p50_ms']:.2f} p99 {r['user_p99_ms']:.2f} max {r['user_max_ms']:.1f} ms"
              f"  |  socket p50 {r['socket_p50_ms']:.2f} p99 {r['socket_p99_ms']:.2f} max {r['socket_max_ms']:.1f} ms"
              f"  |  client read delay p50 {r['read_delay_p50_ms']:.2f} p99 {r['read_delay_p99_ms']:.2f} ms"
              f"  |  over 20 ms: user {r['user_over_20ms']}, socket {r['socket_over_20ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
