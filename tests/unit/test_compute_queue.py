"""The stage's compute thread runs queued jobs in the order the schedule picks."""

from __future__ import annotations

import asyncio
import threading

from gptjt_core.schedule import GPipe
from worker.compute import BACKWARD, FORWARD, OTHER, ComputeQueue


async def _queue_behind_a_busy_job(queue: ComputeQueue, kinds) -> tuple[list[str], threading.Event, list]:
    """Occupy the thread, then queue one job per kind; returns (run order, release, awaitables)."""
    ran: list[str] = []
    busy, release = threading.Event(), threading.Event()
    first = asyncio.ensure_future(queue.run(OTHER, lambda: (busy.set(), release.wait(5))))
    await asyncio.to_thread(busy.wait, 5)
    jobs = []
    for i, kind in enumerate(kinds):
        jobs.append(asyncio.ensure_future(queue.run(kind, lambda name=f"{kind.name}{i}": ran.append(name))))
    await asyncio.sleep(0.05)  # every job is queued before the thread is free
    return ran, release, [first, *jobs]


def test_1f1b_runs_backward_then_forward_then_other_oldest_first():
    async def main():
        queue = ComputeQueue()
        ran, release, jobs = await _queue_behind_a_busy_job(queue, [OTHER, FORWARD, BACKWARD, FORWARD, BACKWARD])
        release.set()
        await asyncio.gather(*jobs)
        queue.close()
        return ran

    assert asyncio.run(main()) == ["BACKWARD2", "BACKWARD4", "FORWARD1", "FORWARD3", "OTHER0"]


def test_a_schedule_that_waits_holds_the_job_until_close():
    """GPipe's flush with a forward still to come: the backward waits; closing runs it anyway."""
    async def main():
        queue = ComputeQueue(pick=lambda ready: GPipe.pick(ready, forwards_left=1))
        ran, release, jobs = await _queue_behind_a_busy_job(queue, [BACKWARD, FORWARD])
        release.set()
        await jobs[2]  # the forward
        await asyncio.sleep(0.05)
        before_close = list(ran)
        await asyncio.to_thread(queue.close)
        await asyncio.gather(*jobs)
        return before_close, ran

    before_close, ran = asyncio.run(main())
    assert before_close == ["FORWARD1"]
    assert ran == ["FORWARD1", "BACKWARD0"]


def test_a_job_whose_caller_was_cancelled_before_it_started_does_not_run():
    """A stage load a newer assignment replaced (worker/watch_reader.py) builds no stage."""
    async def main():
        queue = ComputeQueue()
        ran, release, jobs = await _queue_behind_a_busy_job(queue, [OTHER, OTHER])
        jobs[1].cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches the future before the thread is free
        release.set()
        await asyncio.gather(*jobs, return_exceptions=True)
        queue.close()
        return ran

    assert asyncio.run(main()) == ["OTHER1"]
