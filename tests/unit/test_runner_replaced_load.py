"""The worker runner after a stage load a newer RunState cancelled (worker/watch_reader.py): it
still holds the stage it had, and given that range back at a new restore epoch it keeps the
weights and reports READY again (the chaos soak hung when it stayed LOADING)."""

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


def test_a_cancelled_load_leaves_the_held_stage_and_getting_its_range_back_is_ready_again():
    async def main():
        run = RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(seq_len=16, precision="fp32"))
        runner = WorkerRunner(WorkerOptions(coordinator="127.0.0.1:1"))
        runner.run = run
        runner.loader = StageLoader(run, "cpu", runner.compute, None, None, None)
        runner.averagers = AveragerKeeper(run, "127.0.0.1", runner.heartbeat_soon)  # no DHT peers: none built
        runner.checker = SpotChecker("w", runner.compute, None, None, lambda: (-1, None), run.train.global_batch,
                                     CheckWeights(run, "cpu", runner.compute, None))
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
