"""One compute thread per stage, backward jobs first (1F1B frees activations early)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

BACKWARD, FORWARD, OTHER = 0, 1, 2  # priorities: lower runs first


class ComputeQueue:
    """Runs submitted callables one at a time on a dedicated thread.

    Torch autograd graphs built by a forward are consumed by the matching backward on the
    same thread; one thread also keeps a stage from oversubscribing its cores.
    """

    def __init__(self, name: str = "stage-compute"):
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def run(self, priority: int, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if self._closed:
                raise RuntimeError("compute queue is closed")
            heapq.heappush(self._heap, (priority, next(self._order), fn, loop, future))
            self._cv.notify()
        return await future

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, fn, loop, future = heapq.heappop(self._heap)
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
