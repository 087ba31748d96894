"""When the coordinator's garbage collector runs: on a clock, not when CPython's counters say.

Full passes. With 5,000 workers the coordinator holds ~800k tracked objects (mostly grpc.aio's
machinery for each worker's Watch stream: ~100 objects a stream). CPython's automatic full
collection walks all of them and stops the event loop for 300-600 ms on 2 cores; in `gptjt bench
heartbeat` each such pause delayed ~250 heartbeats and set the p99 on its own. Nearly all of the
coordinator's garbage is freed by reference counting, so full passes run every
FULL_COLLECTION_EVERY_S instead (cycles wait that long to be freed: memory, not correctness).

Young passes. CPython starts one when the tracked objects allocated exceed those freed by 700.
Each heartbeat on a worker's stream (coordinator/heartbeats.py) makes the objects that wait for
its next beat (~30: the read's coroutines, async-generator steps, futures and callbacks) and
frees those its previous beat made, so with 10,000 streams allocations and frees nearly cancel:
the count crept, the young generations grew to ~25k live objects (the waits of the last
seconds' beats) and each pass over them stopped the loop for 10-50 ms (probe of 2026-12-07, 500
beats/s). A young pass every YOUNG_COLLECTION_EVERY_S walks only what the last 0.1 s made and
left alive (under 3 ms each in the same probe); each object is still walked once in each young
generation, so the collector's work is the same, in short pieces.
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
YOUNG_COLLECTION_EVERY_S = 0.1  # ~50 heartbeats' leftovers at 500 beats/s
MIDDLE_COLLECTION_EVERY = 2  # young passes per generation-1 pass: its pause walks two passes' survivors
NO_AUTOMATIC_FULL_PASS = 1_000_000  # gen-1 passes before CPython would start a full one


def take_full_collections_off_the_clock() -> None:
    """For a process without an event loop (the status process, bench churn): generations 0 and 1
    stay automatic; full (generation 2) passes run only from `collect_fully_if_due`."""
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


async def collect_on_the_clock(young_every_s: float = YOUNG_COLLECTION_EVERY_S,
                              middle_every: int = MIDDLE_COLLECTION_EVERY,
                              full_every_s: float = FULL_COLLECTION_EVERY_S) -> None:
    """Every collection of an event-loop process, until cancelled: automatic collection off (on
    again when this ends), a young pass every `young_every_s` seconds, generation 1 at every
    `middle_every`-th, and a full pass, logged with what it took and freed, every `full_every_s`."""
    gc.disable()
    try:
        passes, last_full_s = 0, time.monotonic()
        while True:
            await asyncio.sleep(young_every_s)
            if time.monotonic() - last_full_s >= full_every_s:
                last_full_s = _collect_fully_and_log()
                continue
            passes += 1
            gc.collect(1 if passes % middle_every == 0 else 0)
    finally:
        gc.enable()


def _collect_fully_and_log() -> float:
    t0 = time.perf_counter()
    freed = gc.collect()
    log.info("full garbage collection: %d objects freed in %.0f ms (%d tracked)", freed,
             (time.perf_counter() - t0) * 1e3, len(gc.get_objects()))
    return time.monotonic()
