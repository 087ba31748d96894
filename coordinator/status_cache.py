"""The status object, built off the event loop and shared by the Status RPC, the dashboard and /metrics.

With thousands of workers the status object is megabytes of JSON and hundreds of
milliseconds to build; built on the event loop, every heartbeat arriving meanwhile would
wait that long. So a process of its own builds it (coordinator/status_process.py), at most
one build at a time, and callers share the newest build if it was started after the caller's
view of the ledger (`version`) and is at most `max_age_s` old. Routine heartbeats do not move
`version` (ledger/db.py `tx(quiet=True)`), so liveness fields may be up to `max_age_s` old;
anything an operator or a worker changes shows at once.
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
        self._built: tuple[int, float, bytes, bytes] | None = None  # version, monotonic s, JSON, metrics
        self.builds = 0

    async def get(self) -> tuple[bytes, bytes]:
        """(status JSON, /metrics text): no older than what the ledger held when this was called."""
        wanted = self.ledger.version
        async with self._lock:
            built = self._built
            if built is None or built[0] < wanted or time.monotonic() - built[1] > self.max_age_s:
                version = self.ledger.version  # the snapshot, taken after this, holds at least that much
                body, metrics = await asyncio.to_thread(self.process.build)
                built = self._built = (version, time.monotonic(), body, metrics)
                self.builds += 1
            return built[2], built[3]

    def close(self) -> None:
        self.process.close()
