"""The coordinator's garbage collections run on its clock, not on CPython's counters."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from coordinator.gc_schedule import (NO_AUTOMATIC_FULL_PASS, collect_fully_if_due, collect_on_the_clock,
                                    full_collections_off_the_clock)


@contextmanager
def passes_seen() -> Iterator[list[tuple[int, int]]]:
    """(generation, objects freed) of each collection in the block, in order: those this thread
    ran. A thread another test left behind may call gc.collect() meanwhile (the full CI run once saw
    a full pass that freed nothing inside the block, after the integration tests); that is no pass
    the schedule started, and callbacks run in the thread that collects."""
    passes: list[tuple[int, int]] = []
    ours = threading.get_ident()

    def seen(phase, info):
        if phase == "stop" and threading.get_ident() == ours:
            passes.append((info["generation"], info["collected"]))

    gc.callbacks.append(seen)
    try:
        yield passes
    finally:
        gc.callbacks.remove(seen)


@contextmanager
def full_passes_seen() -> Iterator[list[int]]:
    """The objects each full (generation 2) collection in the block freed, in order."""
    full_passes: list[int] = []
    with passes_seen() as passes:
        yield full_passes
        full_passes.extend(freed for generation, freed in passes if generation == 2)


def leave_a_cycle() -> None:
    cycle = []
    cycle.append(cycle)  # garbage only a collection frees, not reference counting


def test_every_collection_runs_on_the_clock_and_automatic_collection_comes_back_after():
    """Young passes at each tick, generation 1 at every `middle_every`-th, a full pass when one is
    due (freeing a cycle only a full pass can), and no pass that allocations start: a test that
    allocates thousands of objects inside sees no collection beyond the clock's."""
    assert gc.isenabled()
    old_cycle = []
    old_cycle.append(old_cycle)
    holder = [old_cycle]
    del old_cycle
    gc.collect()  # the cycle is in the oldest generation now: no young pass looks at it

    async def scenario():
        with passes_seen() as passes:
            task = asyncio.create_task(collect_on_the_clock(young_every_s=0.01, middle_every=3, full_every_s=0.25))
            await asyncio.sleep(0)  # the task starts: automatic collection off
            assert not gc.isenabled()
            kept = [[] for _ in range(20_000)]  # 28x CPython's young threshold, between two ticks
            holder.clear()  # the old cycle is garbage: the next full pass frees it
            for _ in range(500):  # a full pass over a big test process takes a while
                if sum(generation == 2 for generation, _ in passes) >= 2:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return passes, kept

    passes, kept = asyncio.run(scenario())
    assert gc.isenabled(), "automatic collection stayed off after the schedule ended"
    generations = [generation for generation, _ in passes]
    full = [freed for generation, freed in passes if generation == 2]
    assert len(full) >= 2 and sum(full) >= 1 and kept
    young_runs = " ".join("".join(map(str, generations)).split("2"))  # the young passes between full ones
    assert "00" in young_runs and "1" in young_runs and "000" not in young_runs and "11" not in young_runs


def test_a_process_without_an_event_loop_collects_fully_only_when_due():
    """The status process, between builds: a full pass once `every_s` has passed, not at every call."""
    with full_passes_seen() as full_passes:
        last = time.monotonic()
        assert collect_fully_if_due(last, every_s=3600) == last and full_passes == []
        leave_a_cycle()
        assert collect_fully_if_due(last - 2, every_s=1) > last
    assert len(full_passes) == 1 and full_passes[0] >= 1


def test_a_caller_with_its_own_clock_collects_on_that_clock():
    """bench churn passes virtual time: a pass when its clock (not the wall) says one is due."""
    with full_passes_seen() as full_passes:
        assert collect_fully_if_due(1000.0, every_s=600, now_s=1599.0) == 1000.0 and full_passes == []
        leave_a_cycle()
        assert collect_fully_if_due(1000.0, every_s=600, now_s=1600.0) == 1600.0
    assert len(full_passes) == 1 and full_passes[0] >= 1


def test_a_block_runs_without_automatic_full_passes_and_the_thresholds_come_back():
    """bench churn drives the ledger in a process that runs other benchmarks after it: inside the
    block no allocation starts a full pass; after it (an exception included) CPython's thresholds
    are as they were. CPython starts a full pass when the objects that survived the young
    generations since the last one exceed a quarter of those it holds: each phase keeps as many
    new objects alive as the process tracks."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # CPython's defaults
        gc.collect()
        with full_passes_seen() as inside:
            with full_collections_off_the_clock():
                assert gc.get_threshold() == (700, 10, NO_AUTOMATIC_FULL_PASS)
                kept = [[] for _ in range(len(gc.get_objects()))]
        assert inside == [] and kept
        try:
            with full_collections_off_the_clock():
                raise KeyError("inside")
        except KeyError:
            pass
        assert gc.get_threshold() == (700, 10, 10)
        with full_passes_seen() as outside:
            kept = [[] for _ in range(len(gc.get_objects()))]
        assert outside, "no automatic full pass after the block: the test does not show they come back"
    finally:
        gc.set_threshold(*before)
