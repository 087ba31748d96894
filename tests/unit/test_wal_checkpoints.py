"""The ledger's WAL copied back into the database file by a thread of its own."""

from __future__ import annotations

import shutil
import sqlite3
import time

from coordinator.ledger.wal_checkpoints import WalCheckpoints


def _rows_in_file_alone(path, copy) -> int:
    """Rows the database file holds without its log: what has been copied back."""
    shutil.copyfile(path, copy)
    with sqlite3.connect(copy) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM beats").fetchone()[0]
        except sqlite3.OperationalError:  # the table itself is still only in the log
            return 0


def test_commits_reach_the_database_file_without_a_commit_copying_them(tmp_path):
    path = tmp_path / "run.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")  # no commit copies the log back: only the thread can
    writer.execute("CREATE TABLE beats(id INTEGER PRIMARY KEY, at REAL)")
    for i in range(200):
        writer.execute("INSERT INTO beats(at) VALUES(?)", (time.time(),))
    assert _rows_in_file_alone(path, tmp_path / "before.db") == 0  # all in the log so far
    checkpoints = WalCheckpoints(path, interval_s=0.01).start()
    try:
        deadline = time.monotonic() + 10
        while checkpoints.checkpoints < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        writer.execute("INSERT INTO beats(at) VALUES(?)", (time.time(),))  # PASSIVE: the writer still writes
    finally:
        checkpoints.stop()
    assert checkpoints.checkpoints >= 2 and not checkpoints._thread.is_alive()
    assert _rows_in_file_alone(path, tmp_path / "after.db") >= 200
    writer.close()
