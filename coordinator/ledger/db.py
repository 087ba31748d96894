"""The ledger's one connection (SQLite, or PostgreSQL for a standby): transactions, meta, the clock.

Every mutation of the ledger is one transaction (`with db.tx():`), so a `kill -9` between two
calls loses nothing. `version` counts committed transactions: the gRPC server pushes a new
RunState to Watch streams when it moves. Transactions do not nest: the RunLedger facade opens
them, the stores and the step machine only execute statements inside them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .schema import create_or_upgrade, json_field, json_object_size

ALIVE_STATES = ("loading", "ready", "standby", "draining")


def alive_marks() -> str:
    """'?, ?, ?, ?': placeholders for ALIVE_STATES in an IN (...) clause."""
    return ",".join("?" * len(ALIVE_STATES))


class Transaction:
    """What the block of `LedgerDB.tx()` may say about itself: `quiet` (see tx)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet


def is_database_url(location: str | Path) -> bool:
    """A ledger location that names a PostgreSQL database rather than a SQLite file."""
    return str(location).startswith(("postgresql://", "postgres://"))


class LedgerDB:
    """The connection (autocommit outside `tx()`), typed access to `meta`, and the clock.

    `path` is a SQLite file (WAL) or a postgresql:// URL (coordinator.ledger_url): the same
    statements run on both (pg_dialect.py), so the same rules hold."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time, read_only: bool = False):
        """read_only: a second connection to a ledger another LedgerDB writes, for reads off the
        event loop (`snapshot()`); any write through it fails."""
        self.clock = clock
        self.version, self.rollbacks = 0, 0
        self._parsed: dict[str, tuple[str | None, object]] = {}  # shared_json_meta: key -> (text, value)
        self.postgres = is_database_url(path)
        if self.postgres:
            from .postgres import PostgresConnection, redacted

            self.path = str(path)
            self.where = redacted(self.path)  # for messages: the URL without its password
            self.conn = PostgresConnection(self.path, read_only=read_only)
            if not read_only:
                self.conn.create_schema()
            return
        self.path = Path(path)
        self.where = str(self.path)
        if read_only:
            self.conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                                        check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.create_function("gptjt_json_object_size", 1, json_object_size, deterministic=True)
        self.conn.create_function("gptjt_json_field", 2, json_field, deterministic=True)
        if not read_only:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # survives kill -9 (not power loss)
            create_or_upgrade(self.conn)

    def try_lead(self) -> bool:
        """Become the one coordinator that writes this ledger, if no other is (PostgreSQL: an
        advisory lock held by this connection until it closes). A SQLite file has one writer by
        construction: always True."""
        return self.conn.try_lead() if self.postgres else True

    def still_leading(self) -> bool:
        """The leadership taken by try_lead still holds (PostgreSQL: its connection answers)."""
        return self.conn.still_leading() if self.postgres else True

    def execute(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, args)

    @contextmanager
    def tx(self, quiet: bool = False) -> Iterator[Transaction]:
        """One transaction: committed (and `version` bumped if it wrote) unless the block raises. `quiet`: the
        block changes nothing a Watch stream shows (a routine heartbeat), so `version` stays and
        no stream wakes: with thousands of workers, waking every stream on every heartbeat is
        O(workers^2) work a second. The block may decide it at its end (`as t: ... t.quiet = ...`)."""
        written, t = self.conn.total_changes, Transaction(quiet)
        self.conn.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
        try:
            yield t
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.rollbacks += 1  # what was read inside is no longer so (changes())
            raise
        self.conn.execute("COMMIT")
        if not t.quiet and self.conn.total_changes != written:  # a transaction that wrote nothing wakes nobody
            self.version += 1

    @contextmanager
    def savepoint(self, name: str = "part") -> Iterator[None]:
        """A part of the open transaction that is undone alone if it raises (SQLite SAVEPOINT):
        the caller may catch the error and commit the rest."""
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            self.rollbacks += 1  # as for a whole transaction: what was read inside is no longer so
            raise
        self.conn.execute(f"RELEASE {name}")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every query in the block sees the same committed state (WAL)."""
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ" if self.postgres else "BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def writes(self) -> int:
        """Rows written through this connection so far, quiet transactions included (the status
        object is rebuilt when this moved)."""
        return self.conn.total_changes

    def changes(self) -> tuple[int, int, int]:
        """The key of what is computed once per state of the ledger (AssignmentView's facts):
        moves with every committed transaction but quiet ones (which change nothing those read),
        every rollback, and every write inside an open transaction."""
        return self.version, self.rollbacks, self.conn.total_changes if self.conn.in_transaction else -1

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                          "value=excluded.value", (key, str(value)))

    def json_meta(self, key: str, default):
        raw = self.meta(key)
        return json.loads(raw) if raw else default

    def shared_json_meta(self, key: str, default):
        """json_meta for a value read far more often than it is written (the plan's standby reasons
        and link candidates: read for every link probe and Watch push, ~1,000 entries at 1,000
        workers), parsed once per stored text. The value is shared between callers: never change it."""
        raw = self.meta(key)
        kept = self._parsed.get(key)
        if kept is None or kept[0] != raw:
            kept = self._parsed[key] = raw, (json.loads(raw) if raw else default)
        return kept[1]

    def set_json_meta(self, key: str, value) -> None:
        self.set_meta(key, json.dumps(value))

    def close(self) -> None:
        self.conn.close()
