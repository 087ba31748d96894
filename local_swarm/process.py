"""One child process of a local swarm: a console script whose output goes to a log file we can search."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent  # the console scripts of the environment we run in


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process that must keep its port
    across restarts; otherwise pass port 0 and read the bound port back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SwarmProcess:
    """A console script in its own session (so its children, e.g. hivemind's p2pd daemons, can be
    killed with it), stdout and stderr captured to `log`."""

    def __init__(self, args: list[str], log: Path, cwd: Path, env: dict | None = None):
        self.args, self.log = args, log
        self._fh = open(log, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.p = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                  start_new_session=True)

    @property
    def name(self) -> str:
        return self.log.stem

    @property
    def alive(self) -> bool:
        return self.p.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        """The log once it contains `needle`; AssertionError with the log's end if the process
        exits first or `timeout` seconds pass."""
        def found() -> str:
            text = self.text()
            return text if needle in text else ""

        return self._poll(found, repr(needle), timeout)

    def wait_for_file(self, path: Path, timeout: float = 60.0) -> str:
        """The stripped contents of `path` once this process has written them (e.g. the bound
        address in a --port-file, written after the ready lines); AssertionError as wait_for's."""
        return self._poll(lambda: path.read_text().strip() if path.is_file() else "", f"{path} written", timeout)

    def _poll(self, found: Callable[[], str], what: str, timeout: float) -> str:
        """found()'s first non-empty answer, polled every 0.1 s; AssertionError with the log's end
        if the process exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = found()
            if answer:
                return answer
            if self.p.poll() is not None:
                raise AssertionError(f"{self.log.name} exited ({self.p.returncode}) before {what}:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.log.name}: no {what} within {timeout}s:\n{self.text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process itself (not its group: its children are on their own, as
        when an operator or the OOM killer kills one process)."""
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a worker drains, the coordinator shuts down), SIGKILL after `timeout`."""
        self.kill(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            return self.p.wait(5)
        finally:
            self._fh.close()

    def kill_group(self) -> None:
        """SIGKILL the process's whole session: whatever it left behind goes too."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._fh.close()
