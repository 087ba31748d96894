"""The worker's Watch stream read in a task of its own, so that a stage load a newer RunState has
made pointless is cancelled, not finished.

A load copies a stage's state from a replica or the checkpoint store: for a GPT-J 6B stage
(4-7 layers of 201 M parameters, 12 bytes each with the AdamW moments) over a volunteer's link
that is minutes. The Watch loop used to await the load before reading the next RunState, so a
re-plan that arrived meanwhile waited for the load of the plan it replaced: bench churn saw a
seed's first step open at 1,056 s after two re-plans in 30 s chained three loads. Now the
runner reads on while it loads (load_unless_reassigned), and the first RunState that assigns
something else (another stage or range, standby, another restore epoch) cancels the load; the
Watch loop then acts on it as on any other. A RunState that assigns the same waits for the load,
in order, as before. A cancelled load leaves the worker LOADING on the stage it held before (if
any): the runner then takes the next RunState's assignment whatever its plan version, and a
worker given back the range it still holds is READY again at once (runner._apply_assignment).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine

from gptjt_proto import coordinator_pb2 as cpb

log = logging.getLogger("gptjt.worker")

CANCEL_POLL_S = 0.05  # how often a replaced load that may not be cancelled yet is looked at again


def load_target(state: cpb.RunState) -> tuple[int, int, int, int]:
    """What a load for `state` brings the worker to: (stage, start layer, end layer, restore epoch);
    stage -1 is standby (nothing to load)."""
    a = state.assignment
    if a.stage < 0:
        return -1, 0, 0, state.restore_epoch
    return a.stage, a.start_layer, a.end_layer, state.restore_epoch


class WatchReader:
    """RunStates of a Watch stream, in order, read as they arrive (next(), arrived_after()). The
    stream's end reads as None; an error it raised is raised by next()."""

    def __init__(self, stream: AsyncIterator[cpb.RunState]):
        self._items: deque = deque()  # RunState, then None at the end or the stream's exception
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: AsyncIterator[cpb.RunState]) -> None:
        try:
            async for state in stream:
                self._put(state)
            self._put(None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the Watch loop raises it where it would have
            self._put(e)

    def _put(self, item) -> None:
        self._items.append(item)
        self._arrived.set()

    async def next(self) -> cpb.RunState | None:
        """The next RunState (None once the stream ended)."""
        await self.arrived_after(0)
        item = self._items.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    async def arrived_after(self, seen: int) -> list:
        """Once more than `seen` items wait unread: the items after the first `seen` (RunStates,
        None for the end, an exception)."""
        while len(self._items) <= seen:
            self._arrived.clear()
            await self._arrived.wait()
        return list(self._items)[seen:]

    def close(self) -> None:
        self._task.cancel()


async def act_on_watch(stream: AsyncIterator[cpb.RunState],
                       act: Callable[[cpb.RunState, WatchReader], Awaitable[None]]) -> None:
    """The worker's Watch loop: act(state, reader) on each RunState of `stream`, in order, until the
    stream ends (`reader` lets a load see the RunStates that arrive while it runs)."""
    reader = WatchReader(stream)
    try:
        while (state := await reader.next()) is not None:
            await act(state, reader)
    finally:
        reader.close()


async def load_unless_reassigned(load: Coroutine, state: cpb.RunState, reader: WatchReader,
                                 cancellable: Callable[[], bool] = lambda: True) -> bool:
    """Run `load` (bringing the worker to what `state` assigns) while the Watch stream is read on.
    True: the load ended (its error, if any, is raised). False: a RunState that arrived meanwhile
    assigns something else, or the stream ended, and the load was cancelled; the Watch loop reads
    that state next. RunStates that assign the same stay unread until the load ends.
    `cancellable`: whether the load may be cancelled now (StageLoader.copying: the copy, not the
    averager built or dropped around it, whose helper process must not be cut off halfway); a
    load that may not be is awaited until it may, or until it ends."""
    task = asyncio.ensure_future(load)
    target, seen = load_target(state), 0
    try:
        while not task.done():
            arrival = asyncio.ensure_future(reader.arrived_after(seen))
            try:
                await asyncio.wait({task, arrival}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrival.cancel()
            if task.done() or not arrival.done() or arrival.cancelled():
                break
            newer = arrival.result()
            seen += len(newer)
            if any(not isinstance(s, cpb.RunState) or load_target(s) != target for s in newer):
                while not cancellable() and not task.done():
                    await asyncio.wait({task}, timeout=CANCEL_POLL_S)
                if not task.done():
                    return False
        task.result()
        return True
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as e:  # a load being replaced failed as it was cancelled: nothing to keep
                log.info("a replaced stage load ended with %s: %s", type(e).__name__, e)
