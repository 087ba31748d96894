"""Background asyncio tasks that never die silently: a failure is logged with its traceback.

asyncio keeps only a weak reference to a task and reports an exception nobody awaited as
"Task exception was never retrieved", at garbage collection, if ever. Both the coordinator and
the worker start fire-and-forget tasks (a probe, a report, a drain); `start_background` keeps
them referenced until they end and logs what killed them, or hands the error to `on_error`
(e.g. a supervisor that stops the process loudly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

_running: set[asyncio.Task] = set()  # strong references until each task is done


def start_background(coro: Coroutine[Any, Any, Any], name: str, log: logging.Logger,
                     on_error: Callable[[BaseException], None] | None = None) -> asyncio.Task:
    """Run `coro` as a task named `name`; a failure goes to `on_error`, else to `log` as an error."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)

    def done(t: asyncio.Task) -> None:
        _running.discard(t)
        if t.cancelled() or t.exception() is None:
            return
        error = t.exception()
        if on_error is not None:
            on_error(error)
        else:
            log.error("background task %s failed: %r", name, error, exc_info=error)

    task.add_done_callback(done)
    return task
