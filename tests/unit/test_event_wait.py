"""A timed wait for an event: set, timed out, and cancelled in the very turn the event is set."""

from __future__ import annotations

import asyncio
import time

from gptjt_core.event_wait import wait_for_event


def test_a_wait_says_whether_the_event_came_or_the_time_ran_out():
    async def scenario():
        event = asyncio.Event()
        t0 = time.monotonic()
        timed_out = await wait_for_event(event, 0.05)
        waited = time.monotonic() - t0
        asyncio.get_running_loop().call_later(0.01, event.set)
        return timed_out, waited, await wait_for_event(event, 60.0)

    timed_out, waited, came = asyncio.run(scenario())
    assert timed_out is False and waited >= 0.05 and came is True


def test_a_cancel_that_comes_as_the_event_is_set_is_not_lost():
    """Python 3.11's asyncio.wait_for returns here instead, and a loop being stopped goes on."""
    async def scenario():
        event = asyncio.Event()
        waiting = asyncio.create_task(wait_for_event(event, 60.0))
        await asyncio.sleep(0)  # it waits
        event.set()
        waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(scenario()), "the wait returned: the cancel was lost"
