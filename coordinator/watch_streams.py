"""How Watch streams learn of ledger changes without costing the coordinator O(workers) per write.

Every worker holds one Watch stream. A write that changes what a stream shows bumps the
ledger's `version` (quiet transactions do not: ledger/db.py) and `notify()` wakes the streams;
each then reads its worker's RunState at a random moment of the next
len(streams) / READS_PER_S seconds, so 5,000 streams woken together spread their reads
instead of queueing them behind each other (and behind heartbeats).

Standby workers (no stage) are most of a large swarm and act on none of a step's progress
(worker/runner.py: they act on being placed, a restore, a drain, a pause and the links to
measure). Their streams wake only when `standby_key()` (AssignmentView.standby_key: those
facts, read once per ledger state) changes, not at every micro-batch commit or closed step:
at 10,000 workers, waking every stream at every step cost 10,000 reads a step and most of
the heartbeat tail (gptjt bench heartbeat). A standby's stream re-reads periodically too
(below), but sends what it read only if what a standby acts on moved (`standby_view`), so the
step fields a standby holds are those of the last state it was sent. When what standbys act on
does change, all of them read: those reads are spread at STANDBY_READS_PER_S, however long
that takes, since standbys act on nothing within seconds.
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
        # The futures of the streams waiting for the version to move (placed) or for standby_key
        # to change (standby); a wake-up sets them all and starts new sets.
        self._placed_waiting: set[asyncio.Future] = set()
        self._standby_waiting: set[asyncio.Future] = set()
        self.open = 0  # streams now open
        self._notified = version()
        self._standby_key = standby_key()
        self.standby_generation = 0  # bumped when standby_key changes
        self.standby_woken = 0  # how many the last change woke: they spread their reads by it

    @property
    def standby_waiting(self) -> int:
        """Standby streams waiting now for standby_key to change."""
        return len(self._standby_waiting)

    async def notify(self) -> None:
        """Wake every placed stream if the ledger's version moved since the last call, and the
        standby streams too if what they act on changed."""
        if self.version() == self._notified:
            return
        self._notified = self.version()
        _wake(self._placed_waiting)
        self._placed_waiting = set()
        key = self.standby_key()
        if key != self._standby_key:
            self._standby_key, self.standby_generation = key, self.standby_generation + 1
            self.standby_woken = self.standby_waiting
            _wake(self._standby_waiting)
            self._standby_waiting = set()

    async def _wait(self, as_standby: bool, until: float) -> bool:
        """Until this stream's kind of change comes (True) or time.monotonic() reaches `until`
        (False). One future and one timer a wait: `asyncio.wait_for(event.wait())` made a task
        and ~10 more objects for each, and 10,000 streams' waits, each alive 30-60 s, were most
        of what the coordinator's young garbage collections walked (10-25 ms passes every ~2 s
        in `gptjt bench heartbeat`, 2026-12-07); a wait also took ~12 us of CPU against ~3."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        waiting = self._standby_waiting if as_standby else self._placed_waiting
        waiting.add(woken)
        timer = loop.call_later(max(0.0, until - time.monotonic()), _settle, woken)
        try:
            return await woken
        finally:
            timer.cancel()
            waiting.discard(woken)  # a no-op once a wake-up has started new sets

    async def states(self, read: Callable[[], dict], cancelled: Callable[[], bool],
                     standby: Callable[[dict], bool] = lambda state: False,
                     standby_view: Callable[[dict], object] = lambda state: state) -> AsyncIterator[dict]:
        """The RunStates one stream sends: `read()` when the ledger moved or the refresh is due,
        yielded only when different from the last one sent. `standby(state)`: the worker has no
        stage, so only a change of what a standby acts on wakes the stream, and between two
        standby states only a change of `standby_view(state)` (what of it a standby acts on) is
        sent: a refresh that finds only the step moved sends nothing (at 10,000 workers those
        refreshes were ~220 messages a second, each read, encoded and sent for nothing)."""

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
                    if _differs(state, last, standby, standby_view):
                        last = state
                        yield state
                woken_with_the_standbys = False
                if mark(last) == seen:
                    as_standby = seen[0] == "standby"
                    changed = await self._wait(as_standby, refresh_at)
                    woken_with_the_standbys = as_standby and changed  # not by its refresh time
                spread_s = (self.standby_woken / STANDBY_READS_PER_S if woken_with_the_standbys
                            else min(1.0, self.open / READS_PER_S))
                await asyncio.sleep(random.uniform(0.0, spread_s))
        finally:
            self.open -= 1


def _differs(state: dict, last: dict | None, standby: Callable[[dict], bool],
             standby_view: Callable[[dict], object]) -> bool:
    """Is `state` news to a stream that last sent `last`?"""
    if last is None or not (standby(state) and standby(last)):
        return state != last
    return standby_view(state) != standby_view(last)


def _wake(waiting: set[asyncio.Future]) -> None:
    for woken in waiting:
        if not woken.done():
            woken.set_result(True)


def _settle(woken: asyncio.Future) -> None:
    """A wait's timer: its refresh time came first."""
    if not woken.done():
        woken.set_result(False)
