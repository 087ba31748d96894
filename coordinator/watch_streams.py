"""How Watch streams learn of ledger changes without costing the coordinator O(workers) per write.

Every worker holds one Watch stream. A write that changes what a stream shows bumps the
ledger's `version` (quiet transactions do not: ledger/db.py) and `notify()` wakes the streams;
each then reads its worker's RunState at a random moment of the next
len(streams) / READS_PER_S seconds, so 5,000 streams woken together spread their reads
instead of queueing them behind each other (and behind heartbeats).

Standby workers (no stage) are most of a large swarm and act on none of a step's progress
(worker/runner.py: they act on the plan, a restore, a drain, a pause and the links to
measure). Their streams wake only when `standby_key()` (AssignmentView.standby_key: those
facts, read once per ledger state) changes, not at every micro-batch commit or closed step:
at 10,000 workers, waking every stream at every step cost 10,000 reads a step and most of
the heartbeat tail (gptjt bench heartbeat). A standby's step fields are refreshed with the
periodic re-read below. When what standbys act on does change, all of them read: those reads
are spread at STANDBY_READS_PER_S, however long that takes, since standbys act on nothing
within seconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Hashable

# A stream re-reads its RunState without a ledger change every 30-60 s (drawn per read): only
# which links are due for measuring ages by the clock alone, and that after
# scheduler.probe_max_age_s (600 s by default). Each refresh is a read per worker: at 5,000
# workers a 10 s period cost the heartbeat p99 ~20 ms (gptjt bench heartbeat). The period is
# drawn per stream, or the streams one change woke together would all refresh together ever after.
REFRESH_S = 60.0
# All streams together read at most this many RunStates a second (each waits at most 1 s).
READS_PER_S = 5_000.0
# The standby streams one change woke read at most this many a second, however many they are.
# At 10,000 workers a read and its send cost the loop ~0.3 ms: the 10,000 reads of one change
# packed into 1 s (the cap above) held it for ~3 s, and heartbeats waited as long (a p99 of
# 2.3 s in `gptjt bench heartbeat`, a loop watchdog, 2026-12-05). At this rate they take ~30 %
# of the loop, and the last of 10,000 standbys hears of a new plan ~10 s after it (1,000: ~1 s).
STANDBY_READS_PER_S = 1_000.0


class WatchStreams:
    """The streams' shared wake-up: `notify()` after a ledger write, `states()` per stream."""

    def __init__(self, version: Callable[[], int], standby_key: Callable[[], Hashable] = lambda: None):
        """version: the ledger's current version (RunLedger.version); standby_key: what a standby
        acts on (AssignmentView.standby_key), compared at each version change."""
        self.version, self.standby_key = version, standby_key
        self.changed = asyncio.Event()  # replaced at each wake-up: set() wakes every waiter at once
        self.standby_changed = asyncio.Event()
        self.open = 0  # streams now open
        self._notified = version()
        self._standby_key = standby_key()
        self.standby_generation = 0  # bumped when standby_key changes
        self.standby_waiting = 0  # standby streams waiting for standby_key to change
        self.standby_woken = 0  # how many the last change woke: they spread their reads by it

    async def notify(self) -> None:
        """Wake every placed stream if the ledger's version moved since the last call, and the
        standby streams too if what they act on changed."""
        if self.version() == self._notified:
            return
        self._notified = self.version()
        self.changed.set()
        self.changed = asyncio.Event()
        key = self.standby_key()
        if key != self._standby_key:
            self._standby_key, self.standby_generation = key, self.standby_generation + 1
            self.standby_woken = self.standby_waiting
            self.standby_changed.set()
            self.standby_changed = asyncio.Event()

    async def states(self, read: Callable[[], dict], cancelled: Callable[[], bool],
                     standby: Callable[[dict], bool] = lambda state: False) -> AsyncIterator[dict]:
        """The RunStates one stream sends: `read()` when the ledger moved or the refresh is due,
        yielded only when different from the last one sent. `standby(state)`: the worker has no
        stage, so only a change of what a standby acts on wakes the stream."""

        def mark(state: dict | None) -> tuple:  # what must move for this stream to read again
            if state is not None and standby(state):
                return "standby", self.standby_generation
            return "placed", self.version()

        self.open += 1
        try:
            last, seen, refresh_at = None, None, 0.0
            while not cancelled():
                if mark(last) != seen or time.monotonic() >= refresh_at:
                    state = read()  # no await between the read and its mark: no change falls in between
                    seen, refresh_at = mark(state), time.monotonic() + REFRESH_S * random.uniform(0.5, 1.0)
                    if state != last:
                        last = state
                        yield state
                woken_with_the_standbys = False
                if mark(last) == seen:
                    as_standby = seen[0] == "standby"
                    event = self.standby_changed if as_standby else self.changed
                    self.standby_waiting += as_standby
                    try:
                        await asyncio.wait_for(event.wait(), timeout=max(0.0, refresh_at - time.monotonic()))
                    except TimeoutError:
                        pass
                    finally:
                        self.standby_waiting -= as_standby
                    woken_with_the_standbys = as_standby and event.is_set()  # not by its refresh time
                spread_s = (self.standby_woken / STANDBY_READS_PER_S if woken_with_the_standbys
                            else min(1.0, self.open / READS_PER_S))
                await asyncio.sleep(random.uniform(0.0, spread_s))
        finally:
            self.open -= 1
