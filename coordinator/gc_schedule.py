"""When the coordinator's garbage collector makes a full pass: on a schedule, not mid-heartbeat.

With 5,000 workers the coordinator holds ~800k tracked objects (mostly grpc.aio's machinery
for each worker's Watch stream: ~100 objects a stream). CPython's automatic full collection
walks all of them and stops the event loop for 300-600 ms on 2 cores; in `gptjt bench heartbeat`
each such pause delayed ~250 heartbeats and set the p99 on its own. Nearly all of the
coordinator's garbage is freed by reference counting, so full passes are moved off the
automatic trigger and run every FULL_COLLECTION_EVERY_S instead (cycles wait that long to be
freed: memory, not correctness). Young-generation passes stay automatic (they are short).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

FULL_COLLECTION_EVERY_S = 600.0  # one pause of ~0.5 s (5,000 workers) each ten minutes
NO_AUTOMATIC_FULL_PASS = 1_000_000  # gen-1 passes before CPython would start a full one


def take_full_collections_off_the_clock() -> None:
    """Leave generations 0 and 1 automatic; full (generation 2) passes only from `collect_fully_forever`."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, NO_AUTOMATIC_FULL_PASS)


@contextmanager
def full_collections_off_the_clock() -> Iterator[None]:
    """take_full_collections_off_the_clock for a block, the thresholds as they were after it: for a
    process that runs the coordinator's code among other work (bench churn drives the real ledger;
    `gptjt bench all` runs other benchmarks in the same process after it)."""
    before = gc.get_threshold()
    take_full_collections_off_the_clock()
    try:
        yield
    finally:
        gc.set_threshold(*before)


def collect_fully_if_due(last_s: float, every_s: float = FULL_COLLECTION_EVERY_S,
                         now_s: float | None = None) -> float:
    """For a process with no event loop: a full collection if `every_s` seconds have passed since
    `last_s`; returns when the last one ran. `now_s` is time.monotonic() unless the caller keeps
    its own clock: the status process, between builds, passes none; bench churn, which drives the
    real ledger, passes its virtual time so that it collects as often as the coordinator would."""
    now = time.monotonic() if now_s is None else now_s
    if now - last_s < every_s:
        return last_s
    gc.collect()
    return now


async def collect_fully_forever(every_s: float = FULL_COLLECTION_EVERY_S) -> None:
    """A full collection every `every_s` seconds, logged with what it took and freed."""
    while True:
        await asyncio.sleep(every_s)
        t0 = time.perf_counter()
        freed = gc.collect()
        log.info("full garbage collection: %d objects freed in %.0f ms (%d tracked)", freed,
                 (time.perf_counter() - t0) * 1e3, len(gc.get_objects()))
