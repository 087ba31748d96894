"""A ledger in PostgreSQL: a connection that answers like the sqlite3 one the stores use, and the
leadership lock that keeps a standby coordinator from ever writing beside the active one.

Only coordinator/ledger/db.py uses this module. `PostgresConnection` runs each statement
through pg_dialect.translate, returns rows that read by name and by position (like sqlite3.Row)
and counts the rows written (`total_changes`, which tells LedgerDB whether a transaction
changed anything). Leadership is a session-level advisory lock on the writing connection
itself: the coordinator that holds it is the only one that writes, and if its process dies
or its connection breaks, PostgreSQL releases the lock and every later write of the old
holder fails, so two coordinators can never both commit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import psycopg
from psycopg.adapt import Loader
from psycopg.pq import TransactionStatus

from .pg_dialect import pg_schema, translate
from .schema import ADDED_COLUMNS

# The advisory-lock key of "the coordinator that writes this ledger" (any fixed 64-bit number:
# advisory locks are per database, and one database holds one run's ledger).
LEADER_LOCK_KEY = 0x67707A6A74  # "gptjt"


class NumberLoader(Loader):
    """NUMERIC results (PostgreSQL's SUM of integers, AVG) as int or float, as SQLite returns
    them, never Decimal (which JSON and the stores' arithmetic do not take)."""

    def load(self, data) -> int | float:
        text = bytes(data).decode()
        try:
            return int(text)
        except ValueError:  # a fraction, an exponent, NaN or Infinity
            return float(text)


class Row(tuple):
    """A result row read by position or by column name; dict(row) gives {name: value}."""

    __slots__ = ()
    names: dict[str, int] = {}

    def __getitem__(self, key):
        return tuple.__getitem__(self, self.names[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self.names)


@lru_cache(maxsize=1024)
def _row_type(names: tuple[str, ...]) -> type:
    """One Row class per column list (the stores run a few hundred distinct queries)."""
    return type("Row", (Row,), {"__slots__": (), "names": {name: i for i, name in enumerate(names)}})


def _row_factory(cursor) -> Callable:
    return _row_type(tuple(c.name for c in cursor.description or []))


def _argument(value):
    """sqlite3 takes bools as integers and stores NUL in text; PostgreSQL does neither."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


class PostgresConnection:
    """The surface of sqlite3.Connection that LedgerDB uses, over one psycopg connection in
    autocommit mode (transactions are the explicit BEGIN/COMMIT LedgerDB sends)."""

    def __init__(self, url: str, read_only: bool = False, connect_timeout_s: float = 10.0):
        try:
            # TCP keepalives both ways (~11 s): across a network partition the leader learns that its
            # connection is gone, and the server frees the leadership lock for a standby, in seconds
            # rather than after the kernel's default of two hours.
            self.raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout_s)),
                                       keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                                       options="-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
                                               "-c tcp_keepalives_count=3")
        except psycopg.OperationalError as e:
            raise ConnectionError(f"cannot reach the ledger database {redacted(url)}: {str(e).strip()}; check "
                                  "coordinator.ledger_url and that PostgreSQL is running") from None
        self.raw.adapters.register_loader("numeric", NumberLoader)
        self.raw.row_factory = _row_factory
        self.total_changes = 0
        if read_only:
            self.raw.execute("SET default_transaction_read_only = on")

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def execute(self, sql: str, args: tuple | list = ()):
        cursor = self.raw.execute(translate(sql), [_argument(a) for a in args] if args else None)
        if cursor.rowcount > 0 and sql.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.total_changes += cursor.rowcount
        return cursor

    def create_schema(self) -> None:
        """The tables (in PostgreSQL's types), once; a second coordinator finds them there."""
        with self.raw.transaction():
            self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (LEADER_LOCK_KEY + 1,))  # one creator at a time
            self.raw.execute(pg_schema())
            for table, column, declaration in ADDED_COLUMNS:
                kind = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}.get(declaration, declaration)
                self.raw.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

    def try_lead(self) -> bool:
        """Take the leadership lock if nobody holds it; held until this connection closes."""
        return bool(self.raw.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone()[0])

    def still_leading(self) -> bool:
        """The connection that holds the lock still answers (if it broke, PostgreSQL has let the
        lock go and a standby may lead already: the caller must stop serving)."""
        try:
            self.raw.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        self.raw.close()


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.partition(':')[0]}@{tail}"

