"""The worker runner after a stage load a newer RunState cancelled (worker/watch_reader.py): it
still holds the stage it had, and given that range back at a new restore epoch it keeps the
weights and reports READY again (the chaos soak hung when it stayed LOADING). And a replica
that loaded the run's first state but missed the step copies the state from a peer."""

from __future__ import annotations

import asyncio

from gptjt_core.config import ModelConfig, RunConfig, TrainConfig
from gptjt_proto import coordinator_pb2 as cpb
from worker.averager_keeper import AveragerKeeper
from worker.check_weights import CheckWeights
from worker.options import WorkerOptions
from worker.runner import WorkerRunner
from worker.spot_check import SpotChecker
from worker.stage_loader import StageLoader


def _state(start: int, end: int, epoch: int) -> cpb.RunState:
    return cpb.RunState(plan_version=epoch, restore_epoch=epoch, restore_step=0,
                        assignment=cpb.StageAssignment(stage=1, start_layer=start, end_layer=end))  # a middle stage


def _runner() -> WorkerRunner:
    run = RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(seq_len=16, precision="fp32"))
    runner = WorkerRunner(WorkerOptions(coordinator="127.0.0.1:1"))
    runner.run = run
    runner.loader = StageLoader(run, "cpu", runner.compute, None, None, None)
    runner.averagers = AveragerKeeper(run, "127.0.0.1", runner.heartbeat_soon)  # no DHT peers: none built
    runner.checker = SpotChecker("w", runner.compute, None, None, lambda: (-1, None), run.train.global_batch,
                                 CheckWeights(run, "cpu", runner.compute, None))
    return runner


def test_a_replica_that_missed_the_first_step_while_loading_copies_the_state():
    """It loaded the run's first state (step 0, the restore step) while another replica ran step 0
    alone; at step 2 it is not a member and a replica holds the state: it must copy it, not count
    its step-0 weights as current (it stayed READY at step 0 and never took part)."""
    async def main():
        runner = _runner()
        try:
            first = _state(1, 2, epoch=1)
            await runner._apply_assignment(first.assignment, first)
            assert (runner.status, runner.stage.position) == (cpb.READY, 0)
            copies = []

            async def copy(a, spec, state, held, loaded_epoch):  # the peer's answer is not what this tests
                copies.append(list(a.peer_addresses))
                return None  # no replica could give it: try again on the next RunState

            runner.loader.load = copy
            later = _state(1, 2, epoch=1)
            later.step, later.assignment.member = 2, False
            later.assignment.peer_addresses.append("127.0.0.1:2")
            assert runner._behind(later)
            await runner._apply_assignment(later.assignment, later)
            assert copies == [["127.0.0.1:2"]] and runner.status == cpb.READY and runner.stage.position == 0
            at_restore = _state(1, 2, epoch=1)  # the run at its restore step: the held state is the one
            at_restore.assignment.peer_addresses.append("127.0.0.1:2")
            await runner._apply_assignment(at_restore.assignment, at_restore)
            assert len(copies) == 1
        finally:
            await asyncio.to_thread(runner.compute.close)

    asyncio.run(main())


def test_a_cancelled_load_leaves_the_held_stage_and_getting_its_range_back_is_ready_again():
    async def main():
        runner = _runner()
        try:
            first = _state(1, 2, epoch=1)
            await runner._apply_assignment(first.assignment, first)
            assert (runner.status, runner.stage.spec.end, runner.loaded_epoch) == (cpb.READY, 2, 1)
            held = runner.stage

            moved = _state(1, 3, epoch=2)  # a re-plan: layers 1-3; the next one cancels its copy
            load = asyncio.ensure_future(runner._apply_assignment(moved.assignment, moved))
            while not runner.loader.copying:
                await asyncio.sleep(0)
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
            assert runner.status == cpb.LOADING and runner.stage is held

            back = _state(1, 2, epoch=3)  # and the plan after gives layers 1-2 back
            await runner._apply_assignment(back.assignment, back)
            assert (runner.status, runner.stage, runner.loaded_epoch) == (cpb.READY, held, 3)
        finally:
            await asyncio.to_thread(runner.compute.close)

    asyncio.run(main())
