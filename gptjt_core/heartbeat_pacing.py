"""When a worker's next heartbeat goes: one interval after the last one was sent, give or take a tenth.

A coordinator that stalls (a busy moment, a garbage collection) answers the heartbeats that
arrived meanwhile all at once. Workers that then waited a fixed interval would beat together
from then on, and every later stall would add to the clump: in `gptjt bench heartbeat` at
10,000 workers, bursts of 300-480 slow round trips came back every 20 s, one interval apart
(2026-12-05). A fresh draw of +-JITTER of the interval at each beat spreads such a clump over
a fifth of an interval (4 s of 20) by the next beat; the mean interval stays the same.
"""

from __future__ import annotations

import asyncio
import random
import time

from .event_wait import wait_for_event

JITTER = 0.1  # +- this share of the interval; well inside the heartbeat timeout (4 intervals)


def next_heartbeat_in(interval_s: float, since_sent_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next heartbeat, `since_sent_s` after the last one was sent:
    timed from the send, so a slow answer does not push the worker's beats later."""
    draw = (rng or random).uniform(1.0 - JITTER, 1.0 + JITTER)
    return max(0.0, interval_s * draw - since_sent_s)


async def wait_for_next_heartbeat(asked: asyncio.Event, interval_s: float, sent_s: float) -> None:
    """Until the next heartbeat is due (the last went at `sent_s`, time.monotonic()) or `asked` is
    set (something to report now); clears `asked`."""
    await wait_for_event(asked, next_heartbeat_in(interval_s, time.monotonic() - sent_s))
    asked.clear()
