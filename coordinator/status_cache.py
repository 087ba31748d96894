"""The status object, built off the event loop and shared by the Status RPC, the dashboard and /metrics.

With thousands of workers the status object is megabytes of JSON and hundreds of
milliseconds to build; built on the event loop, every heartbeat arriving meanwhile would
wait that long. So a process of its own builds it (coordinator/status_process.py), at most
one build at a time, and callers share the newest build if it was started after the last
write the caller could have seen (`LedgerDB.writes()`, routine heartbeats included) and is at
most `max_age_s` old (`last_heartbeat_s` and ages move with the clock alone).

Builds are also spaced so that the status process is busy at most BUILD_SHARE of the time: at
10,000 workers a build took ~1 s (most of it the /metrics text, now rendered only for a
scrape: ~0.15 s without it before heartbeats fill in the workers' metrics, ~0.2 s after,
`gptjt bench status`), and a poller and a dashboard asking every
second (each ask after a heartbeat wants a new build) kept that process at ~85 % of a core,
on a host whose cores the event loop needs for heartbeats (gptjt bench heartbeat,
2026-12-05). A caller arriving early waits for the next allowed build instead of getting an
older status: what it gets is still as new as the ledger it could have seen, later by up to
(1 / BUILD_SHARE - 1) build times: ~0.5 s at 10,000 workers, where the status is then
refreshed about every second; unnoticeable at tens of workers, whose builds take milliseconds.
"""

from __future__ import annotations

import asyncio
import time

from .status_process import StatusProcess

# The share of wall-clock time the status process may spend building (one build at a time).
BUILD_SHARE = 0.25


class StatusCache:
    """Builds and shares the status JSON; renders its /metrics text when asked."""

    def __init__(self, ledger, max_age_s: float = 1.0, build_share: float = BUILD_SHARE):
        """ledger: the coordinator's RunLedger (a process reads its file)."""
        self.ledger, self.max_age_s, self.build_share = ledger, max_age_s, build_share
        self.process = StatusProcess(ledger.path, ledger.run, ledger.planner.plan, ledger.shape)
        self._lock = asyncio.Lock()  # one build at a time
        self._built: tuple[int, float, bytes, bytes] | None = None  # writes, monotonic s, JSON, its gzip
        self._next_build_s = 0.0  # monotonic: the earliest start that keeps builds within build_share
        self.builds = 0

    async def get(self) -> bytes:
        """The status JSON: no older than what the ledger held when this was called."""
        return (await self._current())[2]

    async def gzipped(self) -> bytes:
        """get()'s JSON gzipped (gptjt_core/status_gzip.py), compressed by the status process."""
        return (await self._current())[3]

    async def _current(self) -> tuple[int, float, bytes, bytes]:
        wanted = self.ledger.db.writes()
        async with self._lock:
            built = self._built
            if built is None or built[0] < wanted or time.monotonic() - built[1] > self.max_age_s:
                await asyncio.sleep(self._next_build_s - time.monotonic())  # returns at once if <= 0
                version = self.ledger.db.writes()  # the snapshot, taken after this, holds at least that much
                started = time.monotonic()
                (body, gzipped), took = await asyncio.to_thread(self.process.build)
                self._next_build_s = started + took / self.build_share
                built = self._built = (version, started, body, gzipped)
                self.builds += 1
            return built

    async def metrics(self) -> bytes:
        """The /metrics text of a status no older than what the ledger held when this was called
        (the status process renders it from its last build, which may be newer still)."""
        await self.get()
        async with self._lock:
            started = time.monotonic()
            text, took = await asyncio.to_thread(self.process.metrics)
            self._next_build_s = max(self._next_build_s, started + took / self.build_share)
            return text

    def close(self) -> None:
        self.process.close()
