"""The status object built in a process of its own, so its CPU never competes with the event loop's.

With thousands of workers the status object is megabytes of JSON and hundreds of
milliseconds of Python to build. In a thread of the coordinator it would hold the GIL for
most of that time and every heartbeat would wait behind it; in this process it runs on
another core. The process opens the ledger read-only (a second SQLite connection; WAL lets
it read the last committed state while the coordinator writes), and answers each "build"
with the status JSON and its gzip (and, when asked, the /metrics text of it). It is a fresh
interpreter running this module (`python -m coordinator.status_process FD`), not a multiprocessing child:
"spawn" would first re-import the coordinator's main script (torch and all, ~4 s), and a
coordinator killed meanwhile would leave it running that long. This module imports no torch
(the ledger plans with gptjt_core.stage_spec), so it starts in well under a second. It ends
when asked, or when the coordinator's end of the socket closes (the coordinator died).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from gptjt_core.config import RunConfig
from gptjt_core.stage_spec import StageSpec
from gptjt_core.status_gzip import gzip_status

from .cost_model import ModelShape


class StatusBuildFailed(RuntimeError):
    """The status process could not build the status object (its message says why)."""


class StatusProcess:
    """One status-building process; `build()` blocks (call it from a thread)."""

    def __init__(self, path: str | Path, run: RunConfig, plan: list[StageSpec], shape: ModelShape | None):
        self._args = (str(path), run, list(plan), shape)
        self._lock = threading.Lock()  # one request at a time on the pipe
        # Answers come back through a file (unlinked: nothing is left behind), the pipe says only
        # their length. Received through the pipe, a 6 MB status (10,000 workers) was read in
        # ~200 KB pieces and unpickled with the GIL held: the event loop's thread lost the GIL
        # for 5-10 ms a status (a loop timer's p99 lateness 5-6 ms against 1.3-1.6 ms through
        # a file, by hand, 2026-12-07). os.pread copies the whole answer with the GIL released.
        self._answers = tempfile.TemporaryFile(prefix="gptjt-status-")
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)  # where the coordinator package is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        answers = self._answers.fileno()
        self._process = subprocess.Popen([sys.executable, "-m", "coordinator.status_process", str(theirs.fileno()),
                                          str(answers)],
                                         pass_fds=[theirs.fileno(), answers], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(self._args)

    def build(self) -> tuple[tuple[bytes, bytes], float]:
        """((status JSON, the same gzipped), seconds the process spent building both, not counting
        its start); a process that died is started again once."""
        (body, gzipped), seconds = self._ask("build")
        return (body, gzipped), seconds

    def metrics(self) -> tuple[bytes, float]:
        """(/metrics text of the last status built, or of a new one if none was; seconds spent)."""
        (text,), seconds = self._ask("metrics")
        return text, seconds

    def _ask(self, request: str) -> tuple[list[bytes], float]:
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._conn.send(request)
                    kind, body, seconds = self._conn.recv()
                    if kind == "ok":  # body: the lengths of the answer's parts, one after another in the file
                        body = _read_answer(self._answers.fileno(), body)
                    break
                except (EOFError, BrokenPipeError, ConnectionResetError):
                    if attempt == 2:
                        raise StatusBuildFailed("the status process died twice in a row; see the coordinator's "
                                                "log for its traceback") from None
                    self._conn.close()
                    self._wait()
                    self._start()
        if kind != "ok":
            raise StatusBuildFailed(body.decode())
        return body, seconds

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self._conn.close()
        self._wait()
        self._answers.close()

    def _wait(self, timeout_s: float = 5.0) -> None:
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout_s)


class StatusBuilds:
    """What the status process answers, one request at a time: "build" gives the status JSON and
    its gzip (gptjt_core/status_gzip.py: the Status RPC sends that); "metrics" the /metrics text
    of the last status built (or of a new one if none was). The metrics are rendered only when
    asked: at 10,000 workers they are 120,000 samples through prometheus_client, ~1 s of a
    ~1.2 s build (`gptjt bench status`, `by_workers`), and the dashboard and `gptjt status`
    never read them."""

    def __init__(self, reader):
        """reader: a coordinator.ledger.reader.LedgerReader."""
        from .dashboard.metrics import render_metrics
        from .finite_json import dumps

        self.reader, self.render_metrics, self.dumps = reader, render_metrics, dumps
        self.status = None  # the last status built, which "metrics" renders

    def answer(self, request: str) -> list[bytes]:
        """The answer's parts: [JSON, gzipped JSON] for "build", [text] for "metrics"."""
        if request == "metrics":
            status = self.status if self.status is not None else self.reader.status()
            self.status = status
            return [self.render_metrics(lambda: status)]
        self.status = None  # freed before the next is built
        self.status = self.reader.status()
        body = self.dumps(self.status)
        return [body, gzip_status(body)]


def _read_answer(fd: int, lengths: list[int]) -> list[bytes]:
    """The parts the process wrote one after another from the file's start, `lengths` bytes each."""
    parts, start = [], 0
    for length in lengths:
        part = os.pread(fd, length, start)
        if len(part) != length:  # the process wrote less than it said: it died mid-write
            raise StatusBuildFailed(f"the status process said its answer was {sum(lengths)} bytes but the file "
                                    f"holds {start + len(part)}; the next request starts it again if it died")
        parts.append(part)
        start += length
    return parts


def _serve(conn: Connection, answers: int, path: str, run: RunConfig, plan: list[StageSpec],
           shape: ModelShape | None) -> None:
    """The process: answer requests (StatusBuilds) until "stop" or until the coordinator is gone;
    each answer's parts go into the file `answers` (a descriptor), their lengths through `conn`."""
    from .gc_schedule import collect_fully_if_due, take_full_collections_off_the_clock
    from .ledger.reader import LedgerReader

    # A status at 10,000 workers is ~250k objects that live through the build, long enough to
    # count toward CPython's full-collection trigger: it ran a full pass (~100-400 ms, freeing
    # nothing: the status is freed by reference counting) about once a build, ~20 % of a core in
    # `gptjt bench heartbeat` (2026-12-05, gc callbacks). Full passes run between builds instead.
    take_full_collections_off_the_clock()
    last_full_s = time.monotonic()
    builds = StatusBuilds(LedgerReader(path, run, plan, shape))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the coordinator died
            return
        if request == "stop":
            return
        started = time.perf_counter()
        try:
            parts = builds.answer(request)
            written = os.pwritev(answers, parts, 0)
            if written != sum(len(part) for part in parts):  # a full disk: stale bytes could follow
                raise OSError(f"wrote {written} of {sum(len(part) for part in parts)} bytes of the answer; "
                              "is the temporary directory's disk full?")
            conn.send(("ok", [len(part) for part in parts], time.perf_counter() - started))
        except Exception as e:  # said to the caller; the next request tries again
            conn.send(("error", f"{type(e).__name__}: {e}".encode(), time.perf_counter() - started))
        last_full_s = collect_fully_if_due(last_full_s)


# Scheduling priority given up (os.nice): where cores are short, heartbeats, leases and commits
# come before a status object. At 10,000 workers on 2 cores the status process, building every
# second for a poller and a dashboard, took the heartbeat p99 from 230-300 ms to ~145 ms in
# `gptjt bench heartbeat --quick` (by hand, a few runs on a noisy machine).
NICENESS = 10

if __name__ == "__main__":  # started by StatusProcess: its end of a socket pair, the answers' file
    try:
        os.nice(NICENESS)
    except OSError:  # not allowed here: it still builds, at the same priority
        pass
    with Connection(int(sys.argv[1])) as connection:
        try:
            arguments = connection.recv()
        except EOFError:  # the coordinator died before it said what to read
            sys.exit(0)
        _serve(connection, int(sys.argv[2]), *arguments)
