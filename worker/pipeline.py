"""Stage 0's driver: lease tickets, read their micro-batches, push them through the pipeline, commit."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc

from gptjt_core.batches import MicroBatch, MicroBatchBuilder
from gptjt_core.compression import decode
from gptjt_core.data import MicroBatchRef
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import stage_pb2 as spb

from .compute import BACKWARD, FORWARD, OTHER
from .routing import NoReplicaAvailable
from .stage import StaleMicroBatch
from .transport import labels_bytes

if TYPE_CHECKING:
    from .runner import WorkerRunner

log = logging.getLogger(__name__)


class Stage0Driver:
    """Keeps up to `pipeline.in_flight` micro-batches of the open step moving (1F1B at every
    stage: each stage's compute queue runs backward jobs first)."""

    def __init__(self, worker: WorkerRunner):
        self.worker = worker
        self.builder = MicroBatchBuilder(worker.run)
        self._data_pool = ThreadPoolExecutor(1, thread_name_prefix="data")  # readers are not thread-safe
        self.tasks: dict[int, asyncio.Task] = {}  # ticket_id -> task
        self.leased: set[int] = set()
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Lease and process tickets while the step is open; returns when told to stop."""
        w = self.worker
        while not w.stopping.is_set():
            state = w.state
            can_lease = (state is not None and state.phase == cpb.OPEN and not state.paused and not w.leaving
                         and state.assignment.member and w.stage is not None and w.stage.spec.embed
                         and (w.stage.spec.head or w.router.available))
            free = w.run.pipeline.in_flight - len(self.tasks)
            if can_lease and free > 0:
                reply = await w.coordinator.lease(w.worker_id, free)
                for ticket in reply.tickets:
                    self.leased.add(ticket.ticket_id)
                    task = asyncio.create_task(self._process(ticket))
                    self.tasks[ticket.ticket_id] = task
                    task.add_done_callback(lambda _t, tid=ticket.ticket_id: self._done(tid))
                if reply.tickets:
                    continue
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=0.25)
            except TimeoutError:
                pass

    def _done(self, ticket_id: int) -> None:
        self.tasks.pop(ticket_id, None)
        self.wake.set()

    async def _process(self, ticket: cpb.Ticket) -> None:
        w = self.worker
        stage = w.stage
        key = (ticket.ticket_id, ticket.attempt)
        ref = MicroBatchRef(ticket.step, ticket.index, ticket.shard, ticket.offset)
        try:
            mb: MicroBatch = await asyncio.get_running_loop().run_in_executor(self._data_pool, self.builder.build, ref)
            if stage.spec.head:  # a one-stage pipeline
                loss, _, _ = await w.compute.run(FORWARD, lambda: stage.forward_backward(
                    key, ticket.step, mb.input_ids, mb.prefix_lengths, mb.labels, w.run.train.global_batch))
            else:
                out = await w.compute.run(FORWARD, lambda: stage.forward(key, ticket.step, mb.input_ids,
                                                                         mb.prefix_lengths))
                header = spb.MicroBatchHeader(ticket_id=ticket.ticket_id, step=ticket.step, attempt=ticket.attempt,
                                              global_batch=w.run.train.global_batch,
                                              prefix_lengths=mb.prefix_lengths.tolist(),
                                              labels=labels_bytes(mb.labels), stage=1)
                reply, grad = await w.send_downstream(header, out)
                await w.compute.run(BACKWARD, lambda: stage.backward(key, ticket.step, decode(grad)))
                loss = reply.loss
            result = await w.coordinator.commit(w.worker_id, ticket, loss, mb.input_ids.numel())
            self.leased.discard(ticket.ticket_id)
            if result == cpb.STALE:
                log.info("ticket %d: its step attempt was restarted; work discarded", ticket.ticket_id)
        except (Exception, asyncio.CancelledError) as e:  # any failure: the ticket goes back, never stuck
            await w.compute.run(OTHER, lambda: stage.discard(key))
            if isinstance(e, grpc.aio.AioRpcError):
                log.warning("ticket %d failed downstream (%s: %s); handing it back", ticket.ticket_id,
                            e.code().name, e.details())
            elif isinstance(e, NoReplicaAvailable):
                log.warning("ticket %d: %s; handing it back until the coordinator re-plans", ticket.ticket_id, e)
            elif not isinstance(e, (StaleMicroBatch, asyncio.CancelledError)):
                log.error("ticket %d failed: %r; handing it back", ticket.ticket_id, e, exc_info=e)
            await self.release([ticket.ticket_id])
            if isinstance(e, asyncio.CancelledError):
                raise

    async def release(self, ticket_ids: list[int]) -> None:
        ids = [t for t in ticket_ids if t in self.leased]
        if ids:
            await self.worker.coordinator.release(self.worker.worker_id, ids)
            self.leased.difference_update(ids)

    def on_plan_change(self) -> None:
        self.wake.set()

    async def idle(self) -> None:
        """Wait until no micro-batch is in flight."""
        while self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await self.idle()
        await self.release(list(self.leased))
        self._data_pool.shutdown(wait=True)
