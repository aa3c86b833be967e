"""A real PostgreSQL for the tests: Debian's server, a cluster of its own in a temp dir, on a free port of
127.0.0.1, with the durability settings production has (fsync and synchronous_commit on)."""

from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg

# initdb refuses to run as root: a cluster started by root runs as this user (Debian's package creates it).
SERVER_USER = "postgres"


def server_binaries() -> Path | None:
    """The folder with initdb and pg_ctl: Debian keeps them per version under /usr/lib/postgresql; the newest."""
    found = shutil.which("pg_ctl")
    if found and Path(found).resolve().with_name("initdb").exists():
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


# The servers' ports are taken below the range the system hands out for port 0 (32768-60999 on Linux), where
# every other server of the tests listens: one of those can then never take a port a cluster has chosen (it
# binds it only when it starts, and binds it again when a test restarts it).
_PORTS = range(20_000, 30_000)


def _free_port() -> int:
    while True:
        port = random.choice(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class PostgresServer:
    """One cluster: `start()`, `new_database()` for each test, `stop()` (kill -9 style with `immediate`)."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.folder = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        self._names = iter(range(1, 1_000_000))
        self._started = False  # started once: a restart keeps the port, which the tests' URLs name
        self._lock = threading.Lock()

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        """initdb (first time) and start the server; raise with its log if it does not come up."""
        if self._as_root:
            shutil.chown(self.folder, SERVER_USER)
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--locale=C.UTF-8")
        for _ in range(5):  # another test process's cluster may have taken the port meanwhile: take another
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200"
            done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-t", "30",
                             "-o", options, "start", check=False)
            log = (self.folder / "server.log").read_text(errors="replace")
            if done.returncode == 0 or "already in use" not in log or self._started:
                break
            self.port = _free_port()
        self._started = self._started or done.returncode == 0
        if done.returncode != 0:
            log = (self.folder / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {done.stdout}{done.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate`: as if its machine lost power, for the recovery tests)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        """A DATABASE_URL for `database`."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        with self._lock:
            name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        """Stop the server and delete its files."""
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
