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


def cancelled_as_the_event_is_set(wait_on) -> bool:
    """Whether the wait `wait_on(event)` ends cancelled when it is cancelled in the turn of the
    loop that sets `event`. Python 3.11's asyncio.wait_for returns instead: a loop being stopped
    goes on."""
    async def scenario():
        event = asyncio.Event()
        waiting = asyncio.create_task(wait_on(event))
        await asyncio.sleep(0)  # it waits
        event.set()
        waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            return True
        return False

    return asyncio.run(scenario())


def test_a_cancel_that_comes_as_the_event_is_set_is_not_lost():
    assert cancelled_as_the_event_is_set(lambda event: wait_for_event(event, 60.0)), "the cancel was lost"
