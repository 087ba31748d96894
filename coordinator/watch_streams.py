"""How Watch streams learn of ledger changes without costing the coordinator O(workers) per write.

Every worker holds one Watch stream. A write that changes what a stream shows bumps the
ledger's `version` (quiet transactions do not: ledger/db.py) and `notify()` wakes every stream;
each then reads its worker's RunState at a random moment of the next
len(streams) / READS_PER_S seconds, so 5,000 streams woken together spread their reads
instead of queueing them behind each other (and behind heartbeats).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

# A stream re-reads its RunState without a ledger change every 30-60 s (drawn per read): only
# which links are due for measuring ages by the clock alone, and that after
# scheduler.probe_max_age_s (600 s by default). Each refresh is a read per worker: at 5,000
# workers a 10 s period cost the heartbeat p99 ~20 ms (gptjt bench heartbeat). The period is
# drawn per stream, or the streams one change woke together would all refresh together ever after.
REFRESH_S = 60.0
# All streams together read at most this many RunStates a second (each waits at most 1 s).
READS_PER_S = 5_000.0


class WatchStreams:
    """The streams' shared wake-up: `notify()` after a ledger write, `states()` per stream."""

    def __init__(self, version: Callable[[], int]):
        """version: the ledger's current version (RunLedger.version)."""
        self.version = version
        self.changed = asyncio.Condition()
        self.open = 0  # streams now open
        self._notified = version()

    async def notify(self) -> None:
        """Wake every stream if the ledger's version moved since the last call."""
        if self.version() != self._notified:
            self._notified = self.version()
            async with self.changed:
                self.changed.notify_all()

    async def states(self, read: Callable[[], dict], cancelled: Callable[[], bool]) -> AsyncIterator[dict]:
        """The RunStates one stream sends: `read()` when the ledger moved or the refresh is due,
        yielded only when different from the last one sent."""
        self.open += 1
        try:
            last, seen, refresh_at = None, None, 0.0
            while not cancelled():
                if self.version() != seen or time.monotonic() >= refresh_at:
                    seen, refresh_at = self.version(), time.monotonic() + REFRESH_S * random.uniform(0.5, 1.0)
                    state = read()
                    if state != last:
                        last = state
                        yield state
                if self.version() == seen:
                    async with self.changed:
                        try:
                            await asyncio.wait_for(self.changed.wait(), timeout=max(0.0, refresh_at - time.monotonic()))
                        except TimeoutError:
                            pass
                await asyncio.sleep(random.uniform(0.0, min(1.0, self.open / READS_PER_S)))
        finally:
            self.open -= 1
