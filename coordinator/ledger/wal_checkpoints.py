"""The SQLite ledger's log copied back into its file from a thread, so that a commit on the
coordinator's event loop seldom does that work itself.

In WAL mode a commit that finds the log past 1,000 pages (`wal_autocheckpoint`) copies it back
into the database file and fsyncs both files before it returns: ~4 MB and two fsyncs, 8-12 ms on
this machine, for which the event loop waits. At 10,000 workers that is every ~2 s, and the
heartbeats that arrive meanwhile queue behind it (a loop probe in `gptjt bench heartbeat`,
2026-12-08: the loop ran 10-23 ms late at such commits, `db.py` COMMIT on its stack).

So a thread with a connection of its own runs a PASSIVE checkpoint every INTERVAL_S: it copies
and fsyncs what the log holds so far, with the GIL released, and never blocks a writer or a
reader (the status process reads meanwhile). When a commit then reaches 1,000 pages, almost every
page is already copied and synced, and its own checkpoint is short; one that finds this thread's
checkpoint under way skips it. By hand (one-row commits every 1 ms for 15 s on a 10,000-row
table, synchronous=NORMAL): the slowest commit in 1,000 took 2.8-2.9 ms against 8.1-8.9 ms, the
slowest 5-6 ms against 11-12 ms, and time spent in commits over 1 ms 59-76 ms against 152-173 ms.

The commits' own checkpoints stay on: SQLite rewinds the log only when a writer starts with every
page copied back, which a checkpoint in another thread, racing writes every few milliseconds,
seldom leaves it; alone it let the log grow without bound (23 MB in 10 s, bench/README.md).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("gptjt.coordinator")

# Seconds between checkpoints: ~100 pages of log at the 10,000-worker heartbeat rate (~500 pages
# a second), ~1.5 ms each; every 0.5 s left the slowest commit in 1,000 at 3.5 ms (by hand).
INTERVAL_S = 0.1


class WalCheckpoints:
    """A thread copying the WAL of the SQLite ledger at `path` back every `interval_s` until stopped."""

    def __init__(self, path: str | Path, interval_s: float = INTERVAL_S):
        self.path, self.interval_s = str(path), interval_s
        self.checkpoints, self.skipped = 0, 0  # done; found another checkpoint under way (SQLITE_BUSY)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoints", daemon=True)

    def start(self) -> WalCheckpoints:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        warned: set[str] = set()
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # as the writer's: fsync what is copied before the log rewinds
            while not self._stop.wait(self.interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.OperationalError as e:  # a commit's own checkpoint is under way: next time
                    self.skipped += 1
                    if "locked" not in str(e) and "busy" not in str(e) and str(e) not in warned:
                        warned.add(str(e))  # once per kind of failure, not ten times a second
                        log.warning("a WAL checkpoint of %s failed (%s); commits still checkpoint on their own",
                                    self.path, e)
        finally:
            conn.close()
