"""Heartbeats go one interval apart, give or take a tenth, so a clump of them spreads out."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from gptjt_core.heartbeat_pacing import JITTER, next_heartbeat_in, wait_for_next_heartbeat
from tests.unit.test_event_wait import cancelled_as_the_event_is_set


def test_waits_are_timed_from_the_send_and_drawn_within_a_tenth_of_the_interval():
    rng = random.Random(0)
    waits = [next_heartbeat_in(20.0, 0.0, rng) for _ in range(2000)]
    assert min(waits) >= 20.0 * (1 - JITTER) and max(waits) <= 20.0 * (1 + JITTER)
    assert abs(statistics.mean(waits) - 20.0) < 0.1  # the rate the coordinator is sized for
    assert next_heartbeat_in(20.0, 5.0, random.Random(1)) == next_heartbeat_in(20.0, 0.0, random.Random(1)) - 5.0
    assert next_heartbeat_in(20.0, 60.0, rng) == 0.0  # an answer slower than the interval: at once


def test_a_clump_released_together_by_a_stalled_coordinator_is_spread_by_the_next_beat():
    """300 workers whose answers all came at once (the stall's end): their next beats span most
    of a fifth of the interval instead of falling within the same millisecond."""
    rng = random.Random(2)
    next_beats = sorted(next_heartbeat_in(20.0, 0.0, rng) for _ in range(300))
    assert next_beats[-1] - next_beats[0] > 0.9 * 2 * JITTER * 20.0
    busiest_second = max(sum(1 for t in next_beats if s <= t < s + 1) for s in range(17, 23))
    assert busiest_second < 300 / 3


def test_a_worker_waits_for_the_interval_unless_asked_to_beat_now():
    async def scenario():
        asked = asyncio.Event()
        t0 = time.monotonic()
        await wait_for_next_heartbeat(asked, 0.05, t0)
        waited = time.monotonic() - t0
        asked.set()
        t1 = time.monotonic()
        await wait_for_next_heartbeat(asked, 60.0, t1)  # asked: returns at once, and clears it
        return waited, time.monotonic() - t1, asked.is_set()

    waited, asked_wait, still_set = asyncio.run(scenario())
    assert waited >= 0.05 * (1 - JITTER) and asked_wait < 5.0 and not still_set


def test_a_worker_cancelled_as_it_is_asked_to_beat_stops():
    """The cancel and the ask in the same turn of the loop: the wait ends cancelled, and a
    heartbeat loop being shut down stops (gptjt_core/event_wait.py)."""
    assert cancelled_as_the_event_is_set(lambda asked: wait_for_next_heartbeat(asked, 60.0, time.monotonic())), \
        "the wait returned: the cancel was lost"
