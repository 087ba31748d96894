"""The status object, built off the event loop and shared by the Status RPC, the dashboard and /metrics.

With thousands of workers the status object is megabytes of JSON and hundreds of
milliseconds to build; built on the event loop, every heartbeat arriving meanwhile would
wait that long. So a process of its own builds it (coordinator/status_process.py), at most
one build at a time, and callers share the newest build if it was started after the last
write the caller could have seen (`LedgerDB.writes()`, routine heartbeats included) and is at
most `max_age_s` old (`last_heartbeat_s` and ages move with the clock alone).
"""

from __future__ import annotations

import asyncio
import time

from .status_process import StatusProcess


class StatusCache:
    """Builds and shares the status JSON and its /metrics text."""

    def __init__(self, ledger, max_age_s: float = 1.0):
        """ledger: the coordinator's RunLedger (a process reads its file)."""
        self.ledger, self.max_age_s = ledger, max_age_s
        self.process = StatusProcess(ledger.path, ledger.run, ledger.planner.plan, ledger.shape)
        self._lock = asyncio.Lock()  # one build at a time
        self._built: tuple[int, float, bytes, bytes] | None = None  # writes, monotonic s, JSON, metrics
        self.builds = 0

    async def get(self) -> tuple[bytes, bytes]:
        """(status JSON, /metrics text): no older than what the ledger held when this was called."""
        wanted = self.ledger.db.writes()
        async with self._lock:
            built = self._built
            if built is None or built[0] < wanted or time.monotonic() - built[1] > self.max_age_s:
                version = self.ledger.db.writes()  # the snapshot, taken after this, holds at least that much
                body, metrics = await asyncio.to_thread(self.process.build)
                built = self._built = (version, time.monotonic(), body, metrics)
                self.builds += 1
            return built[2], built[3]

    def close(self) -> None:
        self.process.close()
