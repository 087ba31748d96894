"""The weights a standby checks a single-replica stage with: loaded from the checkpoint store.

A stage with one replica has nobody holding the same weights to recompute its micro-batches, so
the coordinator hands its checks to standby workers (coordinator/ledger/spot_checks.py), and only
for steps whose weights exist outside the checked worker's memory: the store's checkpoint of that
step (`SpotCheck.weights == "store"`; written before the step opened) or, at step 0, the model
source ("source"). A standby holds one such stage at a time (the layers and step of the checks it
is answering): checks of one step come together, and a standby has no stage of its own to keep.
"""

from __future__ import annotations

import asyncio
import logging

from gptjt_core.config import RunConfig
from gptjt_core.stage_spec import StageSpec
from gptjt_proto import coordinator_pb2 as cpb

from .compute import OTHER, ComputeQueue
from .stage import LayerSlice

log = logging.getLogger(__name__)


class CheckWeights:
    """Loads (and keeps, one at a time) the stage a store or source spot check recomputes with."""

    def __init__(self, run: RunConfig, device: str, compute: ComputeQueue, get_checkpoint):
        """get_checkpoint(step, spec) -> safetensors blob bytes (CoordinatorClient.get_checkpoint)."""
        self.run, self.device, self.compute, self.get_checkpoint = run, device, compute, get_checkpoint
        self._held: tuple[tuple, LayerSlice] | None = None
        self.loads = 0  # stages loaded since the worker started

    async def stage_for(self, check: cpb.SpotCheck) -> LayerSlice:
        """The stage of `check`'s layers with the weights of `check.step`. Raises ValueError for a
        check that names no weights a standby can load (the caller reports it as unchecked)."""
        spec = StageSpec(check.start_layer, check.end_layer, embed=check.embed, head=check.head)
        if not 0 <= spec.start < spec.end:
            raise ValueError(f"the check names layers {spec.start}-{spec.end}: no stage to load")
        key = (check.step, check.weights, spec.start, spec.end, spec.embed, spec.head)
        if self._held is not None and self._held[0] == key:
            return self._held[1]
        self._held = None  # one stage at a time: let the old one go before loading the next
        if check.weights == "store":
            from safetensors.torch import load

            blob = await self.get_checkpoint(check.step, spec)
            checkpoint = await asyncio.to_thread(load, blob)  # off the event loop: heartbeats go on
        elif check.weights == "source" and check.step == 0:
            checkpoint = None  # the run's initial weights, as every stage builds them
        else:
            raise ValueError(f"a standby cannot load weights {check.weights!r} of step {check.step} (it loads the "
                             "store's checkpoint of a step, or the model source at step 0)")
        stage = await self.compute.run(OTHER, lambda: LayerSlice(self.run, spec, self.device, checkpoint, check.step))
        self.loads += 1
        log.info("loaded stage %s at step %d from the %s to spot-check it", spec, check.step,
                 "checkpoint store" if check.weights == "store" else "model source")
        self._held = key, stage
        return stage

    def drop(self) -> None:
        """Let the held stage go (this worker was given a stage of its own: its memory is needed)."""
        self._held = None
