"""One compute thread per stage; the pipeline schedule (gptjt_core/schedule.py) picks each next job."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from gptjt_core.schedule import Action, Job, OneFOneB

# The kinds of job callers submit (what the schedule orders by).
BACKWARD, FORWARD, OTHER = Action.BACKWARD, Action.FORWARD, Action.OTHER


class ComputeQueue:
    """Runs submitted callables one at a time on a dedicated thread, in the order the schedule's
    `pick` chooses among the queued ones (1F1B: backward, then forward, then other jobs; oldest
    first within a kind).

    Torch autograd graphs built by a forward are consumed by the matching backward on the
    same thread; one thread also keeps a stage from oversubscribing its cores.
    """

    def __init__(self, name: str = "stage-compute",
                 pick: Callable[[Sequence[Job]], Job | None] = OneFOneB.pick):
        self._pick = pick
        self._queued: list[tuple[Job, Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def run(self, kind: Action, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if self._closed:
                raise RuntimeError("compute queue is closed")
            self._queued.append((Job(kind, next(self._order)), fn, loop, future))
            self._cv.notify()
        return await future

    def _next(self) -> tuple | None:
        """The queued entry the schedule picks (call with the lock held); None: wait. Once
        closed, what a waiting schedule leaves runs in arrival order, so close() ends."""
        if not self._queued:
            return None
        job = self._pick([entry[0] for entry in self._queued])
        if job is None and self._closed:
            job = self._queued[0][0]
        if job is None:
            return None
        i = next(i for i, entry in enumerate(self._queued) if entry[0] == job)
        return self._queued.pop(i)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while (entry := self._next()) is None:
                    if self._closed and not self._queued:
                        return
                    self._cv.wait()
            _, fn, loop, future = entry
            if future.cancelled():
                # nobody awaits it (a stage load a newer assignment replaced: watch_reader.py); a
                # read of the future's state from this thread: at worst the job runs, unawaited
                continue
            t0 = time.perf_counter()
            try:
                result, error = fn(), None
            except BaseException as e:  # handed to the awaiting coroutine
                result, error = None, e
            self.busy_seconds += time.perf_counter() - t0
            loop.call_soon_threadsafe(_settle, future, result, error)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued jobs, then stop the thread (a native thread alive at interpreter exit
        can abort the process)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
