"""The coordinator's full garbage collections run on its schedule, not CPython's."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from coordinator.gc_schedule import (NO_AUTOMATIC_FULL_PASS, collect_fully_forever, collect_fully_if_due,
                                    full_collections_off_the_clock, take_full_collections_off_the_clock)


@contextmanager
def full_passes_seen() -> Iterator[list[int]]:
    """The objects each full (generation 2) collection in the block freed, in order: those this
    thread ran. A thread another test left behind may call gc.collect() meanwhile (the full CI run
    once saw a full pass that freed nothing inside the block, after the integration tests); that is
    no pass the thresholds started, and callbacks run in the thread that collects."""
    full_passes: list[int] = []
    ours = threading.get_ident()

    def seen(phase, info):
        if phase == "stop" and info["generation"] == 2 and threading.get_ident() == ours:
            full_passes.append(info["collected"])

    gc.callbacks.append(seen)
    try:
        yield full_passes
    finally:
        gc.callbacks.remove(seen)


def leave_a_cycle() -> None:
    cycle = []
    cycle.append(cycle)  # garbage only a full pass frees


def test_full_passes_leave_the_automatic_trigger_and_run_on_the_schedule():
    before = gc.get_threshold()
    try:
        take_full_collections_off_the_clock()
        assert gc.get_threshold() == (before[0], before[1], NO_AUTOMATIC_FULL_PASS)

        async def scenario():
            with full_passes_seen() as full_passes:
                task = asyncio.create_task(collect_fully_forever(every_s=0.05))
                leave_a_cycle()
                for _ in range(500):  # a full pass over a big test process takes a while
                    if len(full_passes) >= 2:
                        break
                    await asyncio.sleep(0.02)
                task.cancel()
            return full_passes

        passes = asyncio.run(scenario())
        assert len(passes) >= 2 and sum(passes) >= 1
    finally:
        gc.set_threshold(*before)


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
