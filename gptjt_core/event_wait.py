"""Waiting for an asyncio.Event with a time limit, without losing a cancel.

On Python 3.11, `asyncio.wait_for(event.wait(), t)` returns normally when its task is cancelled
in the same turn of the loop that the event is set: the cancel is lost, and a loop meant to stop
(a worker's ticket loop at shutdown, a dashboard stream as the coordinator stops) goes on. One
bench client beat on past its run's end that way and `gptjt bench heartbeat` hung 9 minutes
(2026-12-08). `asyncio.timeout` raises the cancel in that case; every timed wait uses it.
"""

from __future__ import annotations

import asyncio


async def wait_for_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Until `event` is set (True) or `timeout_s` seconds pass (False); a cancel always raises."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
