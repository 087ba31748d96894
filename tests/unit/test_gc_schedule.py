"""The coordinator's full garbage collections run on its schedule, not CPython's."""

from __future__ import annotations

import asyncio
import gc
import time

from coordinator.gc_schedule import (NO_AUTOMATIC_FULL_PASS, collect_fully_forever, collect_fully_if_due,
                                    take_full_collections_off_the_clock)


def test_full_passes_leave_the_automatic_trigger_and_run_on_the_schedule():
    before = gc.get_threshold()
    try:
        take_full_collections_off_the_clock()
        assert gc.get_threshold() == (before[0], before[1], NO_AUTOMATIC_FULL_PASS)

        async def scenario():
            full_passes = []

            def seen(phase, info):
                if phase == "stop" and info["generation"] == 2:
                    full_passes.append(info["collected"])

            gc.callbacks.append(seen)
            try:
                task = asyncio.create_task(collect_fully_forever(every_s=0.05))
                cycle = []
                cycle.append(cycle)  # garbage only a full pass frees
                del cycle
                for _ in range(500):  # a full pass over a big test process takes a while
                    if len(full_passes) >= 2:
                        break
                    await asyncio.sleep(0.02)
                task.cancel()
            finally:
                gc.callbacks.remove(seen)
            return full_passes

        passes = asyncio.run(scenario())
        assert len(passes) >= 2 and sum(passes) >= 1
    finally:
        gc.set_threshold(*before)


def test_a_process_without_an_event_loop_collects_fully_only_when_due():
    """The status process, between builds: a full pass once `every_s` has passed, not at every call."""
    full_passes = []

    def seen(phase, info):
        if phase == "stop" and info["generation"] == 2:
            full_passes.append(info["collected"])

    gc.callbacks.append(seen)
    try:
        last = time.monotonic()
        assert collect_fully_if_due(last, every_s=3600) == last and full_passes == []
        cycle = []
        cycle.append(cycle)
        del cycle
        assert collect_fully_if_due(last - 2, every_s=1) > last
    finally:
        gc.callbacks.remove(seen)
    assert len(full_passes) == 1 and full_passes[0] >= 1
