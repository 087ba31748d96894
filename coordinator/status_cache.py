"""The status object, built off the event loop and shared by the Status RPC, the dashboard and /metrics.

With thousands of workers the status object is megabytes of JSON and a few hundred
milliseconds to build; built on the event loop, every heartbeat arriving meanwhile would wait
that long. So it is built in a thread, from a read-only copy of the ledger (a second SQLite
connection: in WAL mode it reads the last committed state while the event loop goes on
writing), at most one build at a time, and shared: a caller gets the newest build if it was
started after the caller's view of the ledger (`version`) and is at most `max_age_s` old.
Routine heartbeats do not move `version` (ledger/db.py `tx(quiet=True)`), so liveness fields
may be up to `max_age_s` old; anything an operator or a worker changes shows at once.
"""

from __future__ import annotations

import asyncio
import time

from .finite_json import dumps


class StatusCache:
    """Builds and shares the status object and its NaN-free JSON."""

    def __init__(self, ledger, max_age_s: float = 1.0):
        """ledger: the coordinator's RunLedger (its read_only_copy() does the reading)."""
        self.ledger, self.max_age_s = ledger, max_age_s
        self.reader = ledger.read_only_copy()
        self._lock = asyncio.Lock()  # one build at a time: the read connection is not shared
        self._built: tuple[int, float, dict | None, bytes] = (-1, 0.0, None, b"")  # version, monotonic s, status, JSON
        self.builds = 0

    async def get(self) -> tuple[dict, bytes]:
        """(status, its JSON): no older than what the ledger held when this was called."""
        wanted = self.ledger.version
        async with self._lock:
            version, at, status, body = self._built
            if status is None or version < wanted or time.monotonic() - at > self.max_age_s:
                version = self.ledger.version  # the snapshot, taken after this, holds at least that much
                status, body = await asyncio.to_thread(self._build)
                self._built = (version, time.monotonic(), status, body)
            return status, body

    def _build(self) -> tuple[dict, bytes]:
        status = self.reader.status_snapshot()
        self.builds += 1
        return status, dumps(status)

    def close(self) -> None:
        self.reader.db.close()
