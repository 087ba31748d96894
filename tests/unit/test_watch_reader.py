"""A stage load that a newer RunState makes pointless is cancelled, one it does not is awaited
(worker/watch_reader.py): the Watch stream is read on while a stage loads."""

from __future__ import annotations

import asyncio

import pytest

from gptjt_proto import coordinator_pb2 as cpb
from worker.watch_reader import WatchReader, act_on_watch, load_target, load_unless_reassigned


def _state(stage: int, start: int = 0, end: int = 2, epoch: int = 0, plan_version: int = 1) -> cpb.RunState:
    return cpb.RunState(plan_version=plan_version, restore_epoch=epoch,
                        assignment=cpb.StageAssignment(stage=stage, start_layer=start, end_layer=end))


class _Stream:
    """A Watch stream the test feeds (what the coordinator would send)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, item) -> None:  # a RunState, None to end the stream, or an exception to raise
        self.queue.put_nowait(item)

    async def __aiter__(self):
        while (item := await self.queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


class _Load:
    """A stage load that ends when the test says (or fails), recording how it ended."""

    def __init__(self):
        self.finish, self.ended = asyncio.Event(), None

    async def run(self, error: Exception | None = None) -> None:
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        self.ended = "finished"
        if error is not None:
            raise error


def _scenario(newer: list, finish_after: bool, error: Exception | None = None):
    """Start a load for stage 0 (layers 0-2, epoch 0); send `newer` while it runs; then finish it
    if `finish_after`. Returns (load_unless_reassigned's answer, how the load ended, what the
    reader gives next)."""
    async def main():
        stream, load = _Stream(), _Load()
        reader = WatchReader(stream.__aiter__())
        first = _state(0)
        stream.send(first)
        assert await reader.next() is first
        running = asyncio.ensure_future(load_unless_reassigned(load.run(error), first, reader))
        for item in newer:  # all at once: the reader sees them in one look
            stream.send(item)
        await asyncio.sleep(0.01)
        if finish_after:
            load.finish.set()
        try:
            answer = await asyncio.wait_for(running, 2)
        except Exception as e:  # noqa: BLE001 - the load's error, checked by the caller
            answer = e
        following = await asyncio.wait_for(reader.next(), 2) if newer else None
        reader.close()
        return answer, load.ended, following

    return asyncio.run(main())


def test_a_state_that_assigns_another_range_cancels_the_load_and_is_read_next():
    moved = _state(0, 0, 3, plan_version=2)
    answer, ended, following = _scenario([moved], finish_after=False)
    assert (answer, ended) == (False, "cancelled")
    assert following is moved


@pytest.mark.parametrize("newer", [_state(1, plan_version=2), _state(-1, plan_version=2), _state(0, epoch=1)],
                         ids=["another-stage", "standby", "a-restore"])
def test_another_stage_standby_or_a_restore_cancel_the_load(newer):
    answer, ended, following = _scenario([newer], finish_after=False)
    assert (answer, ended, following) == (False, "cancelled", newer)


def test_a_state_that_assigns_the_same_waits_for_the_load_and_stays_unread():
    """A step's progress, a new plan that keeps this worker where it is: the load goes on, and
    the Watch loop acts on those states after it, in order, as before."""
    same = [_state(0, plan_version=2), _state(0, plan_version=3)]
    answer, ended, following = _scenario(same, finish_after=True)
    assert (answer, ended) == (True, "finished")
    assert following is same[0]


def test_a_later_state_that_reassigns_cancels_even_behind_one_that_does_not():
    same, moved = _state(0, plan_version=2), _state(2, 5, 7, plan_version=3)
    answer, ended, following = _scenario([same, moved], finish_after=False)
    assert (answer, ended, following) == (False, "cancelled", same)


def test_the_loads_error_reaches_the_caller():
    answer, ended, _ = _scenario([], finish_after=True, error=RuntimeError("the store is missing step 10"))
    assert ended == "finished" and isinstance(answer, RuntimeError) and "step 10" in str(answer)


def test_the_streams_end_cancels_the_load_and_ends_the_loop():
    answer, ended, following = _scenario([None], finish_after=False)
    assert (answer, ended, following) == (False, "cancelled", None)


def test_act_on_watch_acts_in_order_and_raises_the_streams_error():
    async def main():
        stream, seen = _Stream(), []

        async def act(state, reader):
            seen.append(state.plan_version)

        for v in (1, 2, 3):
            stream.send(_state(0, plan_version=v))
        stream.send(ConnectionError("the coordinator refused the Watch"))
        with pytest.raises(ConnectionError, match="refused"):
            await asyncio.wait_for(act_on_watch(stream.__aiter__(), act), 2)
        return seen

    assert asyncio.run(main()) == [1, 2, 3]


def test_load_target_names_stage_range_and_epoch_and_standby_by_epoch_only():
    assert load_target(_state(1, 2, 5, epoch=3)) == (1, 2, 5, 3)
    assert load_target(_state(-1, 2, 5, epoch=3)) == (-1, 0, 0, 3)


def test_a_load_outside_its_cancellable_part_is_cancelled_only_once_it_enters_it():
    """The averager built or dropped around the copy is not cut off (StageLoader.copying): the
    replaced load is cancelled when its copy begins, not before."""
    async def main():
        stream, reader = _Stream(), None
        reader = WatchReader(stream.__aiter__())
        first, moved = _state(0), _state(1, plan_version=2)
        stream.send(first)
        await reader.next()
        copying, steps = [False], []

        async def load():
            steps.append("averager dropped")
            await asyncio.sleep(0.2)  # not cancellable: a newer state arrives meanwhile
            steps.append("copy begins")
            copying[0] = True
            await asyncio.sleep(10)
            steps.append("copied")

        running = asyncio.ensure_future(load_unless_reassigned(load(), first, reader, lambda: copying[0]))
        await asyncio.sleep(0.05)
        stream.send(moved)
        answer = await asyncio.wait_for(running, 2)
        reader.close()
        return answer, steps

    assert asyncio.run(main()) == (False, ["averager dropped", "copy begins"])
