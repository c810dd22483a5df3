"""A real, throw-away PostgreSQL server for tests: initdb into a temp dir, postgres on a free
loopback port (TCP only), stopped with ``pg_ctl stop -m fast`` and then by process group.

PostgreSQL refuses to run as root; as root we run it as the ``postgres`` system user (or
``$VLLM_OTEL_PG_USER``) through ``setpriv``/``runuser``. Binaries come from
``$VLLM_OTEL_PG_BIN`` (a directory), the newest ``/usr/lib/postgresql/*/bin``, or PATH.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from vllm_otel.testing.processes import ManagedProcess, ProcessFailed, free_port

__all__ = ["PostgresServer", "PostgresNotAvailable", "find_postgres_bin"]

_INSTALL_HINT = ("install the PostgreSQL server (Debian/Ubuntu: apt-get install -y postgresql; "
                 "scripts/setup.sh does it) or point VLLM_OTEL_PG_BIN at its bin directory")


class PostgresNotAvailable(RuntimeError):
    """No usable PostgreSQL server binaries (or no non-root user to run them as)."""


def _version_key(path: str) -> tuple[int, ...]:
    m = re.search(r"/postgresql/([\d.]+)/bin", path)
    return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)


def find_postgres_bin() -> Path:
    """The directory holding initdb, postgres and pg_ctl."""
    explicit = os.environ.get("VLLM_OTEL_PG_BIN")
    candidates: list[str] = [explicit] if explicit else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(os.path.realpath(on_path)).parent))
    for c in candidates:
        d = Path(c)
        if all((d / exe).is_file() and os.access(d / exe, os.X_OK)
               for exe in ("initdb", "postgres", "pg_ctl")):
            return d
    raise PostgresNotAvailable(f"PostgreSQL server binaries not found; {_INSTALL_HINT}")


class PostgresServer:
    """``with PostgresServer() as pg: pg.url`` -> ``postgresql+psycopg://...`` to a fresh database."""

    def __init__(self, *, port: int | None = None, dbname: str = "vllm_otel",
                 user: str = "vllm_otel", startup_timeout_s: float = 60.0) -> None:
        self.bin = find_postgres_bin()
        self.port = port or free_port()
        self.dbname = dbname
        self.user = user  # the database superuser (trust auth, loopback only)
        self.startup_timeout_s = startup_timeout_s
        self.os_user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            name = os.environ.get("VLLM_OTEL_PG_USER", "postgres")
            try:
                self.os_user = pwd.getpwnam(name)
            except KeyError:
                raise PostgresNotAvailable(
                    f"running as root and there is no {name!r} user to run PostgreSQL as; "
                    f"{_INSTALL_HINT} (the package creates it) or set VLLM_OTEL_PG_USER") from None
        # Our own temp dir, not pytest's: pytest's base dir is 0700 root, unreadable for postgres.
        self.root = Path(tempfile.mkdtemp(prefix="vllm-otel-pg-"))
        self.datadir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    def _as_user(self, argv: Sequence[str]) -> list[str]:
        if self.os_user is None:
            return list(argv)
        u = self.os_user
        setpriv = shutil.which("setpriv")
        if setpriv:  # execs in place: the server stays the leader of our process group
            return [setpriv, f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups", "--", *argv]
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", u.pw_name, "--", *argv]
        raise PostgresNotAvailable("running as root without setpriv or runuser to drop privileges")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = env.get("LC_ALL") or "C.UTF-8"
        if self.os_user is not None:
            env["HOME"] = str(self.root)
            env["USER"] = env["LOGNAME"] = self.os_user.pw_name
        return env

    def start(self) -> "PostgresServer":
        if self.os_user is not None:
            os.chown(self.root, self.os_user.pw_uid, self.os_user.pw_gid)
        init = subprocess.run(
            self._as_user([str(self.bin / "initdb"), "-D", str(self.datadir), "-U", self.user,
                           "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"]),
            capture_output=True, text=True, env=self._env(), cwd=self.root, timeout=120)
        if init.returncode != 0:
            raise ProcessFailed(f"initdb failed ({init.returncode}): {init.stdout[-2000:]}{init.stderr[-2000:]}")
        # Durability off: the data is thrown away, and fsync makes tests slow. TCP on loopback
        # only; no Unix socket (nothing to clean up in /var/run).
        argv = self._as_user([str(self.bin / "postgres"), "-D", str(self.datadir),
                              "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
                              "-c", "unix_socket_directories=", "-c", "fsync=off",
                              "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                              "-c", "max_connections=100"])
        self.proc = ManagedProcess("postgres", argv, self.log_path, env=self._env(), cwd=self.root)
        self.proc.start()
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or not self.proc.alive():
                raise ProcessFailed(f"postgres exited during start-up:\n{self.log_tail()}")
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                                     dbname="postgres", autocommit=True, connect_timeout=2) as c:
                    exists = c.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                       (self.dbname,)).fetchone()
                    if not exists:
                        c.execute(f'CREATE DATABASE "{self.dbname}"')
                return
            except psycopg.OperationalError as e:
                last = e
                time.sleep(0.1)
        raise ProcessFailed(f"postgres not ready after {self.startup_timeout_s:.0f} s ({last}):\n"
                            f"{self.log_tail()}")

    def create_database(self, name: str) -> str:
        """A new, empty database on this server (one per test keeps tests independent); its URL."""
        import psycopg

        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True, connect_timeout=5) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.alive():
                subprocess.run(self._as_user([str(self.bin / "pg_ctl"), "stop", "-D", str(self.datadir),
                                              "-m", "fast", "-w", "-t", "20"]),
                               capture_output=True, env=self._env(), cwd=self.root, timeout=30)
            self.proc.stop()  # sweeps the process group whatever pg_ctl did
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
