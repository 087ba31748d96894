"""A private PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary directory,
reachable only through a Unix socket in that directory (no TCP port is opened, so nothing on
the machine can collide with it or reach it). Tests that need it skip, with the reason, where
it cannot start (no binaries: `.ci/run` installs Debian's postgresql package).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

PORT = 5432  # names the socket file inside our own directory; no TCP socket is opened


def _bindir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """initdb + postgres in a fresh directory; `database()` gives a URL to a new empty database."""

    def __init__(self):
        self.bindir = _bindir()
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb); install Debian's postgresql package")
        self.root = Path(tempfile.mkdtemp(prefix="gptjt-pg-"))
        self.data = self.root / "data"
        # PostgreSQL refuses to run as root: as root, the cluster belongs to the postgres user.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # max_connections: every ledger a test opens holds a connection until it is collected
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "log"), "-o",
                  f"-c listen_addresses='' -k {self.root} -p {PORT} -c fsync=off -c max_connections=500", "start")
        self.admin_url = f"postgresql://postgres@/postgres?host={self.root}&port={PORT}"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (self.root / "log").read_text()[-2000:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]} {log}")

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@/{name}?host={self.root}&port={PORT}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
