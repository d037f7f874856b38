"""A real PostgreSQL server on 127.0.0.1 for the tests, started once per session.

PostgreSQL refuses to run as root (CI runs as root), so as root the server runs as the
unprivileged `postgres` user (or `nobody`) in a temp dir that user owns. Missing server
binaries skip the tests on a developer machine and fail them in CI (`CI=true`), where
.ci/run installs Debian's `postgresql`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.user = None
        if os.geteuid() == 0:
            self.user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            if self.user is None:
                raise RuntimeError(
                    "PostgreSQL refuses to run as root and there is no `postgres` or `nobody` user"
                )
        # In /tmp, which the unprivileged user can reach (a root-only TMPDIR would not do).
        self.dir = Path(tempfile.mkdtemp(prefix="bigasp-pg-", dir="/tmp" if self.user else None))
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.port = _free_port()
        self._names = itertools.count()

    def _run(self, *args: str) -> None:
        cmd = ["runuser", "-u", self.user, "--", *args] if self.user else list(args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=self.dir)
        if done.returncode:
            log = self.dir / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}{tail}")

    def start(self) -> None:
        data = self.dir / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "bigasp", "-A", "trust", "--no-sync",
                  "-E", "UTF8")  # fmt: skip
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.dir} -F -c max_connections=50"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.dir / "server.log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        try:
            if (self.dir / "data" / "postmaster.pid").exists():
                data = str(self.dir / "data")
                self._run(str(self.bindir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://bigasp@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg
        from psycopg import sql

        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (see the module docstring)."""
    bindir = _bindir()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found; `apt-get install postgresql`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " (.ci/run does)")
        pytest.skip(reason)
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a fresh, empty database on the session's server."""
    return postgres_server.new_database()
