"""Stage 0's driver: lease tickets, read their micro-batches, push them through the pipeline, commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from gptjt_core.batches import MicroBatch, MicroBatchBuilder
from gptjt_core.config import RunConfig
from gptjt_core.data import MicroBatchRef
from gptjt_core.event_wait import wait_for_event
from gptjt_core.schedule import OneFOneB
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import stage_pb2 as spb

from .commitments import tokens_parts
from .compute import ComputeQueue
from .downstream import DownstreamSender
from .label_wire import labels_to_wire
from .membership import CoordinatorClient, session_ended
from .micro_batch_work import StageInput, work_micro_batch
from .routing import NoReplicaAvailable
from .stage import LayerSlice, StaleMicroBatch

log = logging.getLogger(__name__)


class Stage0Driver:
    """Keeps the open step's micro-batches moving: as many as the schedule admits (1F1B: up to
    `pipeline.in_flight`; each stage's compute queue runs backward jobs first).

    stage: the stage this worker holds now (read when a micro-batch starts: a reload replaces
    it). open_for_work: whether the run takes micro-batches from this worker now (an open
    step, not paused, a member, not leaving). Tickets are leased, committed and released
    with the coordinator as `worker_id`.
    """

    def __init__(self, run: RunConfig, compute: ComputeQueue, downstream: DownstreamSender,
                 coordinator: CoordinatorClient, worker_id: str, stage: Callable[[], LayerSlice | None],
                 open_for_work: Callable[[], bool], loss_scale_of: Callable[[int, int], float]):
        """loss_scale_of(step, attempt): that attempt's loss scale, which a stage 0 that is also the
        last stage applies (RunState.loss_scale)."""
        self.run_config = run
        self.schedule = OneFOneB(run.pipeline.in_flight)
        self.compute = compute
        self.downstream = downstream
        self.coordinator = coordinator
        self.worker_id = worker_id
        self.stage = stage
        self.open_for_work = open_for_work
        self.loss_scale_of = loss_scale_of
        self.builder = MicroBatchBuilder(run)
        self._data_pool = ThreadPoolExecutor(1, thread_name_prefix="data")  # readers are not thread-safe
        self.tasks: dict[int, asyncio.Task] = {}  # ticket_id -> task
        self.leased: set[int] = set()
        self.wake = asyncio.Event()
        self._running: asyncio.Task | None = None  # the task in `run`, ended by `stop`

    def _can_lease(self) -> bool:
        stage = self.stage()
        return (self.open_for_work() and stage is not None and stage.spec.embed
                and (stage.spec.head or self.downstream.available))

    async def run(self, stopping: asyncio.Event) -> None:
        """Lease and process tickets while the step is open; returns once `stopping` is set (or
        `stop` ends it)."""
        self._running = asyncio.current_task()
        while not stopping.is_set():
            free = self.schedule.admissible(len(self.tasks))
            if self._can_lease() and free > 0:
                try:
                    reply = await self.coordinator.lease(self.worker_id, free)
                except grpc.aio.AioRpcError as e:
                    if not session_ended(e):
                        raise
                    # Our session ended (declared dead): stop driving; the heartbeat loop hears
                    # the same refusal on its next beat and the runner joins again. Raising here
                    # made the worker exit instead.
                    log.warning("lease refused: this worker's session has ended; no more tickets")
                    return
                for ticket in reply.tickets:
                    self.leased.add(ticket.ticket_id)
                    task = asyncio.create_task(self._process(ticket))
                    self.tasks[ticket.ticket_id] = task
                    task.add_done_callback(lambda _t, tid=ticket.ticket_id: self._done(tid))
                if reply.tickets:
                    continue
            self.wake.clear()
            await wait_for_event(self.wake, 0.25)

    def _done(self, ticket_id: int) -> None:
        self.tasks.pop(ticket_id, None)
        self.wake.set()

    async def _process(self, ticket: cpb.Ticket) -> None:
        stage = self.stage()
        global_batch = self.run_config.train.global_batch
        ref = MicroBatchRef(ticket.step, ticket.index, ticket.shard, ticket.offset)
        try:
            mb: MicroBatch = await asyncio.get_running_loop().run_in_executor(self._data_pool, self.builder.build, ref)

            def next_header() -> spb.MicroBatchHeader:
                return spb.MicroBatchHeader(ticket_id=ticket.ticket_id, step=ticket.step, attempt=ticket.attempt,
                                            global_batch=global_batch, prefix_lengths=mb.prefix_lengths.tolist(),
                                            labels=labels_to_wire(mb.labels), stage=1)

            item = StageInput((ticket.ticket_id, ticket.attempt), ticket.step, mb.input_ids, mb.prefix_lengths,
                              mb.labels, global_batch, tokens_parts(mb.input_ids, mb.labels, mb.prefix_lengths),
                              loss_scale=self.loss_scale_of(ticket.step, ticket.attempt))
            done = await work_micro_batch(stage, self.compute, self.downstream, item, next_header)
            result = await self.coordinator.commit(self.worker_id, ticket, done.loss, mb.input_ids.numel())
            self.leased.discard(ticket.ticket_id)
            if result == cpb.STALE:
                log.info("ticket %d: its step attempt was restarted; work discarded", ticket.ticket_id)
        except (Exception, asyncio.CancelledError) as e:  # any failure: the ticket goes back, never stuck
            reason = ""  # this worker's own failure, told to the coordinator (routine ones are not)
            if isinstance(e, grpc.aio.AioRpcError):
                log.warning("ticket %d failed downstream (%s: %s); handing it back", ticket.ticket_id,
                            e.code().name, e.details())
            elif isinstance(e, NoReplicaAvailable):
                log.warning("ticket %d: %s; handing it back until the coordinator re-plans", ticket.ticket_id, e)
            elif not isinstance(e, (StaleMicroBatch, asyncio.CancelledError)):
                log.error("ticket %d failed: %r; handing it back", ticket.ticket_id, e, exc_info=e)
                reason = f"{type(e).__name__}: {e}"
            await self.release([ticket.ticket_id], reason)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def release(self, ticket_ids: list[int], reason: str = "") -> None:
        ids = [t for t in ticket_ids if t in self.leased]
        if not ids:
            return
        try:
            await self.coordinator.release(self.worker_id, ids, reason)
        except grpc.aio.AioRpcError as e:
            if not session_ended(e):
                raise
            # Our session is over (declared dead, or its join token revoked with its sessions):
            # the coordinator took every ticket of ours back when it ended it. The worker goes on
            # to join again; failing here killed it instead.
            log.info("tickets %s not handed back: this worker's session has ended (%s)", ids, e.details())
        self.leased.difference_update(ids)

    def on_plan_change(self) -> None:
        self.wake.set()

    async def idle(self) -> None:
        """Wait until no micro-batch is in flight."""
        while self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def stop(self) -> None:
        """End `run` and every micro-batch in flight, and hand back what is leased. `run` ends
        first: `stopping` is read between two leases, and a lease still retrying an unreachable
        coordinator when the runner closed its channel next raised UsageError ("Channel is
        closed"), which stopped a worker the coordinator had declared dead with an error instead
        of letting it join again (the chaos soak, CI 2026-12-05)."""
        if self._running is not None and self._running is not asyncio.current_task():
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)
        for task in list(self.tasks.values()):
            task.cancel()
        await self.idle()
        await self.release(list(self.leased))
        self._data_pool.shutdown(wait=True)
