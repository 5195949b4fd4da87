"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb + pg_ctl, torn down after.

The cluster lives in a fresh directory under the system temp dir, listens on a private unix-socket
directory inside it and on one free TCP port of 127.0.0.1 only, and is stopped (immediate mode) and
deleted by `stop()`. `initdb` refuses to run as root: as root the cluster runs as the `postgres` OS
user (`runuser`), in a directory that user owns; as anyone else, as that user. Local (socket)
connections are trusted; TCP connections need the superuser's password (scram-sha-256), which tests
hand to the server through a file, never argv.

`unavailable()` says why no cluster can be started here (no binaries, no `postgres` user, no
psycopg), so tests skip with that reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from fedpers.client.processes import free_port

PG_USER = "postgres"  # the OS user (when root) and the database superuser


class PgUnavailable(RuntimeError):
    """No throwaway PostgreSQL cluster can be started here; the message says why."""


def find_binary(name: str) -> Path | None:
    """A PostgreSQL server binary: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(directory) / name).exists():
            return Path(directory) / name
    return None


def unavailable() -> str | None:
    """None when a cluster can be started; else the reason (what a test skips with)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'fedpers[postgres]')"
    for name in ("initdb", "pg_ctl", "postgres"):
        if find_binary(name) is None:
            return f"PostgreSQL's {name} is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} OS user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not installed"
    return None


class PgCluster:
    """One throwaway cluster; `start()`, `url(db)`, `create_database(db)`, `stop()`."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.port = 0
        self.password = secrets.token_urlsafe(18)
        self._uid = -1
        self._gid = -1

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *argv] if os.geteuid() == 0 else argv

    def _run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._as_owner(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise PgUnavailable(f"{Path(argv[0]).name} failed (exit {proc.returncode}): "
                                f"{(proc.stderr or proc.stdout)[-2000:]}")
        return proc

    def start(self) -> PgCluster:
        """initdb, configure (127.0.0.1 and a private socket dir only), pg_ctl start -w."""
        reason = unavailable()
        if reason:
            raise PgUnavailable(reason)
        self.root = Path(tempfile.mkdtemp(prefix="fedpers-pg-"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam(PG_USER)
            self._uid, self._gid = owner.pw_uid, owner.pw_gid
            os.chown(self.root, self._uid, self._gid)
        self.sockets.mkdir(mode=0o700)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._uid >= 0:
            for p in (self.sockets, pwfile):
                os.chown(p, self._uid, self._gid)
        try:
            self._run([str(find_binary("initdb")), "-D", str(self.data), "-U", PG_USER, "--pwfile", str(pwfile),
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
            pwfile.unlink()
            self.port = free_port()
            conf = {
                "listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.sockets}'", "max_connections": "60",
                "shared_buffers": "16MB", "fsync": "off", "full_page_writes": "off",  # throwaway: speed
                "log_min_messages": "warning",
            }
            with open(self.data / "postgresql.conf", "a") as fh:
                fh.writelines(f"{k} = {v}\n" for k, v in conf.items())
            self._run([str(find_binary("pg_ctl")), "-D", str(self.data), "-l", str(self.root / "server.log"),
                       "-w", "-t", "60", "start"])
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL over the private unix socket (trusted: no password)."""
        return f"postgresql://{PG_USER}@/{dbname}?host={self.sockets}&port={self.port}"

    def tcp_url(self, dbname: str = "postgres") -> str:
        """A libpq URL over TCP on 127.0.0.1 (the password must come from elsewhere: a file, PGPASSWORD)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """CREATE DATABASE `dbname` (a fresh, empty one) and return its socket URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def log_tail(self, n: int = 30) -> str:
        """The last lines of the server's log (for failure messages)."""
        try:
            return "\n".join((self.root / "server.log").read_text().splitlines()[-n:])  # type: ignore[operator]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (immediate: it is thrown away) and delete everything. Idempotent."""
        if self.root is None:
            return
        if (self.data / "postmaster.pid").exists():
            try:
                self._run([str(find_binary("pg_ctl")), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                          timeout=60)
            except (PgUnavailable, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
