"""Loading the assigned stage: from a replica, from the checkpoint store, or from the model source.

A replica that holds the run's current state is copied, optimizer included, so the new one is
bit-identical and can take part from the next step (a copy none of the stage's members reported
after the last closed step is refused: a replica could hand over altered weights); else the store's file at the restore step
(re-sliced to this range); else the run's initial weights. Loading runs on the compute thread
(and parsing off the event loop), so heartbeats go on while a large stage loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from gptjt_core.config import RunConfig
from gptjt_core.model import StageSpec
from gptjt_core.state_digest import unattested
from gptjt_proto import coordinator_pb2 as cpb

from .compute import OTHER, ComputeQueue
from .probe import reset_peak_memory
from .membership import RETRYABLE, CoordinatorClient
from .simulated_device import ComputePacer, SimulatedDevice
from .stage import LayerSlice
from .transport import StageClient

log = logging.getLogger("gptjt.worker")

LOAD_RETRY_S = 120.0  # how long loading a stage waits out an unreachable coordinator


async def retry_loading(apply: Callable[[], Awaitable[None]], stage: int) -> None:
    """Run `apply` (bring stage `stage` to the state the run names), retrying while the coordinator
    is briefly unreachable (a restart takes seconds) for up to LOAD_RETRY_S, any other failure
    (the store missing a file) three times. Then raise: the worker stops loudly, the coordinator
    times it out and gives the stage to another."""
    deadline, failures = time.monotonic() + LOAD_RETRY_S, 0
    while True:
        try:
            await apply()
            return
        except grpc.aio.AioRpcError as e:
            transient = e.code() in RETRYABLE
            failures += not transient
            log.error("could not load stage %d (%s): %s %s", stage,
                      "the coordinator is unreachable; retrying" if transient else f"try {failures} of 3",
                      e.code().name, e.details())
            if failures >= 3 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(2.0)


class StageLoader:
    """Loads the assigned stage from a replica, the store or the model source."""

    def __init__(self, run: RunConfig, device: str, compute: ComputeQueue, client: StageClient,
                 coordinator: CoordinatorClient, simulated: SimulatedDevice | None):
        self.run, self.device, self.compute = run, device, compute
        self.client, self.coordinator, self.simulated = client, coordinator, simulated
        # True while load() copies or builds a stage: the only part of taking an assignment a newer
        # one may cancel (worker/watch_reader.py); averager and driver changes around it are not
        self.copying = False

    async def load(self, a: cpb.StageAssignment, spec: StageSpec, state: cpb.RunState,
                   held: LayerSlice | None, loaded_epoch: int) -> LayerSlice | None:
        """The stage at the state the run names (None: no replica could give it; try again on the
        next RunState). RPC errors from the store propagate (the caller retries)."""
        self.copying = True
        try:
            return await self._load(a, spec, state, held, loaded_epoch)
        finally:
            self.copying = False

    async def _load(self, a: cpb.StageAssignment, spec: StageSpec, state: cpb.RunState,
                    held: LayerSlice | None, loaded_epoch: int) -> LayerSlice | None:
        position = state.restore_step
        if a.peer_addresses:
            log.info("copying stage %d from a replica (we hold epoch %d position %s; the run is at epoch %d "
                     "step %d, %s)", a.stage, loaded_epoch, held.position if held else None,
                     state.restore_epoch, state.step, cpb.StepPhase.Name(state.phase))
            fetched = await self._fetch_from_peer(list(a.peer_addresses), a.attested_position,
                                                  frozenset(a.attested_digests))
            if fetched is None:
                return None
            checkpoint, position = fetched
        elif state.restore_from_store:
            log.info("loading stage %d (layers %d-%d) at step %d from the checkpoint store", a.stage,
                     a.start_layer, a.end_layer, state.restore_step)
            from safetensors.torch import load

            blob = await self.coordinator.get_checkpoint(state.restore_step, spec)
            checkpoint = await asyncio.to_thread(load, blob)  # off the event loop: heartbeats go on
        else:
            log.info("loading stage %d (layers %d-%d) from %s", a.stage, a.start_layer, a.end_layer,
                     self.run.model.source)
            checkpoint = None
        stage = await self.compute.run(OTHER, lambda: LayerSlice(self.run, spec, self.device, checkpoint, position))
        if self.simulated is not None:
            stage.pacer = ComputePacer(self.simulated, stage.matmul_params())
        reset_peak_memory(self.device)  # the peak workers report is the stage training, not loading
        return stage

    async def _fetch_from_peer(self, addresses: list[str], attested_position: int,
                               attested: frozenset[str]) -> tuple[dict, int] | None:
        """The stage state from the first replica that sends one its stage's members attested
        (gptjt_core/state_digest.unattested; the assignment's attested_digests), and its position."""
        from safetensors.torch import load

        for address in addresses:
            try:
                header, blob = await self.client.fetch_state(address)
            except (grpc.aio.AioRpcError, RuntimeError) as e:
                log.warning("could not fetch the stage state from %s: %s", address,
                            e.details() if isinstance(e, grpc.aio.AioRpcError) else e)
                continue
            tensors = await asyncio.to_thread(load, blob)  # off the event loop: heartbeats go on
            refusal = await asyncio.to_thread(unattested, tensors, header.position, attested_position, attested)
            if refusal:
                log.warning("refusing the stage state from replica %s: %s", address, refusal)
                continue
            log.info("fetched stage state at step %d from replica %s (%.1f MB)", header.position, address,
                     len(blob) / 1e6)
            return tensors, header.position
        return None
