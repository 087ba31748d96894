"""The worker's supervisor: join, take the assigned stage, serve it, follow the step protocol, drain, leave."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from dataclasses import dataclass

import grpc
import torch

from gptjt_core.config import RunConfig, from_dict
from gptjt_core.model import StageSpec
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import stage_pb2_grpc as spb_grpc

from .compute import OTHER, ComputeQueue
from .membership import CoordinatorClient
from .pipeline import Stage0Driver
from .probe import probe_device
from .service import StageService
from .stage import StageRunner
from .transport import GRPC_OPTIONS, LinkCounters, StageClient

log = logging.getLogger("gptjt.worker")


@dataclass
class WorkerOptions:
    """The worker's local knobs; everything about the run comes from the coordinator."""

    coordinator: str
    token: str = ""
    device: str = "cpu"
    listen: str = "127.0.0.1:0"
    announce: str = ""
    """Address other workers use to reach this one (default: the listen address)."""
    name: str = ""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    drain_timeout_s: float = 60.0
    tls_ca: str = ""
    """PEM root certificate to verify a TLS coordinator."""


class WorkerRunner:
    def __init__(self, options: WorkerOptions):
        self.options = options
        self.counters = LinkCounters()
        self.compute = ComputeQueue()
        self.stopping = asyncio.Event()
        self.leaving = False
        self.worker_id = ""
        self.run: RunConfig | None = None
        self.assignment: cpb.StageAssignment | None = None
        self.stage: StageRunner | None = None
        self.state: cpb.RunState | None = None
        self.client: StageClient | None = None
        self.driver: Stage0Driver | None = None
        self._status = cpb.STANDBY
        self._reported: set[tuple[int, int, bool]] = set()
        self.loaded_epoch = -1  # the restore epoch whose state self.stage holds
        self.failed = False  # a loop crashed: the process exits non-zero
        self._state_changed = asyncio.Event()
        self._heartbeat_now = asyncio.Event()
        self._assignment_lock = asyncio.Lock()  # join reply and Watch may both deliver one

    # -- lifecycle ---------------------------------------------------------------------
    async def main(self) -> None:
        o = self.options
        if o.threads:
            torch.set_num_threads(o.threads)
        device = probe_device(o.device)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        spb_grpc.add_StageServicer_to_server(StageService(self), server)
        port = server.add_insecure_port(o.listen)
        if port == 0:
            raise RuntimeError(f"--listen {o.listen}: cannot bind (address in use or not local)")
        await server.start()
        self.address = o.announce or f"{o.listen.rsplit(':', 1)[0]}:{port}"
        credentials = grpc.ssl_channel_credentials(open(o.tls_ca, "rb").read()) if o.tls_ca else None
        self.coordinator = CoordinatorClient(o.coordinator, credentials)
        name = o.name or socket.gethostname()
        reply = await self.coordinator.join(o.token, name, self.address, device)
        self.worker_id = reply.worker_id
        self.run = from_dict(RunConfig, json.loads(reply.run_config_json))
        self.client = StageClient(self.counters, self.run.pipeline.chunk_bytes)
        a = reply.assignment
        where = (f"stage {a.stage} of {a.num_stages} (layers {a.start_layer}-{a.end_layer})" if a.stage >= 0
                 else "standby (every stage has a worker)")
        print(f"gptjt-worker: joined {o.coordinator} as {self.worker_id}, {where}; serving on {self.address} "
              f"({device['kind']}, {device['matmul_tflops']:.3f} TFLOP/s measured)", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_drain)
        tasks = [asyncio.create_task(self._heartbeat_loop(reply.heartbeat_interval_s)),
                 asyncio.create_task(self._watch_loop())]
        for task in tasks:
            task.add_done_callback(self._on_task_done)
        self.assignment = reply.assignment  # the stage is loaded when the first RunState says from what
        await self.stopping.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.driver is not None:
            await self.driver.stop()
        await self.client.close()
        await self.coordinator.close()
        await server.stop(grace=0.5)
        self.compute.close()

    def _on_task_done(self, task: asyncio.Task) -> None:
        """A crashed heartbeat or watch loop would leave a zombie worker: stop loudly instead."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("worker loop failed: %r; stopping (the coordinator will re-issue our work)", task.exception(),
                  exc_info=task.exception())
        self.failed = True
        self.stopping.set()

    def request_drain(self) -> None:
        if not self.leaving:
            log.info("drain requested: finishing the current step, then leaving")
            self.leaving = True
            asyncio.get_running_loop().create_task(self._drain_and_leave())

    async def _drain_and_leave(self) -> None:
        state = self.state
        drain_step = state.step if state is not None else -1
        deadline = time.monotonic() + self.options.drain_timeout_s
        self._status = cpb.DRAINING
        # A single-replica stage can only leave cleanly at a step boundary: keep serving
        # until the step that was open when the drain began has closed.
        while (self.stage is not None and self.state is not None and self.state.phase not in (cpb.DONE, cpb.WAITING)
               and self.state.step <= drain_step and time.monotonic() < deadline):
            self._state_changed.clear()
            try:
                await asyncio.wait_for(self._state_changed.wait(), timeout=0.5)
            except TimeoutError:
                pass
        if self.driver is not None:
            await self.driver.stop()  # hands back anything still leased
        if (self.stage is not None and self.state is not None and self.state.phase == cpb.WAITING
                and self.stage.position == self.state.step):
            # At a step boundary: leave our stage in the store so a newcomer continues from here
            # instead of the run rolling back to the last full checkpoint.
            try:
                await self.save_checkpoint(self.stage.position)
            except grpc.aio.AioRpcError as e:
                log.warning("could not save the stage before leaving (%s); the run will roll back", e.details())
        try:
            await self.coordinator.leave(self.worker_id)
        except grpc.aio.AioRpcError as e:
            log.warning("could not tell the coordinator we leave (%s); it will time us out", e.code().name)
        print(f"gptjt-worker: {self.worker_id} left the run", flush=True)
        self.stopping.set()

    # -- coordinator streams -----------------------------------------------------------
    async def _heartbeat_loop(self, interval: float) -> None:
        last_t, last_busy, last_mb = time.monotonic(), 0.0, 0
        while True:
            now = time.monotonic()
            busy = self.compute.busy_seconds
            mbs = self.stage.micro_batches if self.stage is not None else 0
            dt = max(now - last_t, 1e-6)
            metrics = {"micro_batches_per_s": max(0, mbs - last_mb) / dt, "busy_fraction": min(1.0, (busy - last_busy) / dt),
                       "bytes_sent": self.counters.sent, "bytes_received": self.counters.received,
                       "micro_batches": mbs}
            last_t, last_busy, last_mb = now, busy, mbs
            try:
                known = await self.coordinator.heartbeat(self.worker_id, self._status, metrics, self.loaded_epoch)
            except grpc.aio.AioRpcError as e:
                log.warning("heartbeat failed: %s", e.code().name)
                known = True
            if not known:
                log.error("the coordinator declared this worker dead; stopping (restart the worker to re-join)")
                self.stopping.set()
                return
            try:
                await asyncio.wait_for(self._heartbeat_now.wait(), timeout=interval)
            except TimeoutError:
                pass
            self._heartbeat_now.clear()

    def _heartbeat_soon(self) -> None:
        """State changes (loading -> ready) reach the coordinator now, not at the next tick."""
        self._heartbeat_now.set()

    async def _watch_loop(self) -> None:
        async for state in self.coordinator.watch(self.worker_id):
            previous = self.state
            self.state = state
            self._state_changed.set()
            if (previous is None or previous.plan_version != state.plan_version
                    or previous.restore_epoch != state.restore_epoch):
                for attempt in range(3):
                    try:
                        await self._apply_assignment(state.assignment, state)
                        break
                    except grpc.aio.AioRpcError as e:
                        # e.g. the coordinator restarting, or the store missing a file
                        log.error("could not load stage %d (try %d of 3): %s %s", state.assignment.stage,
                                  attempt + 1, e.code().name, e.details())
                        if attempt == 2:
                            raise  # stop loudly: the coordinator times us out and reassigns the stage
                        await asyncio.sleep(2.0)
                if self.driver is not None:
                    self.driver.on_plan_change()
            await self._follow_step(state)
            if self.driver is not None:
                self.driver.wake.set()

    # -- assignment and the step protocol ----------------------------------------------
    async def _apply_assignment(self, a: cpb.StageAssignment, state: cpb.RunState) -> None:
        async with self._assignment_lock:
            await self._apply_assignment_locked(a, state)

    async def _apply_assignment_locked(self, a: cpb.StageAssignment, state: cpb.RunState) -> None:
        """Hold the assigned stage at the state the run says (restore_epoch / restore_step)."""
        old = self.assignment
        self.assignment = a
        if a.stage < 0:
            if self.stage is not None:
                log.warning("unassigned from stage %d; back to standby", old.stage if old else -1)
            self.stage = None
            self._status = cpb.STANDBY
            return
        spec = StageSpec(a.start_layer, a.end_layer, embed=a.embed, head=a.head)
        if self.stage is not None and self.stage.spec == spec:
            if self.loaded_epoch == state.restore_epoch:
                return
            if self.stage.position == state.restore_step:
                # Our state is the one the run wants: drop partial work, keep the weights.
                await self.compute.run(OTHER, self.stage.reset_to_position)
                self.loaded_epoch = state.restore_epoch
                self._heartbeat_soon()
                return
        self._status = cpb.LOADING
        self._heartbeat_soon()
        t0 = time.perf_counter()
        if state.restore_from_store:
            log.info("loading stage %d (layers %d-%d) at step %d from the checkpoint store", a.stage,
                     a.start_layer, a.end_layer, state.restore_step)
            from safetensors.torch import load

            checkpoint = load(await self.coordinator.get_checkpoint(state.restore_step, spec))
        else:
            log.info("loading stage %d (layers %d-%d) from %s", a.stage, a.start_layer, a.end_layer,
                     self.run.model.source)
            checkpoint = None
        position = state.restore_step
        self.stage = await self.compute.run(OTHER, lambda: StageRunner(self.run, spec, self.options.device,
                                                                       checkpoint, position))
        self.loaded_epoch = state.restore_epoch
        log.info("stage %d ready in %.1fs", a.stage, time.perf_counter() - t0)
        if spec.embed and self.driver is None:
            self.driver = Stage0Driver(self)
            asyncio.create_task(self.driver.run())
        self._status = cpb.DRAINING if self.leaving else cpb.READY
        self._heartbeat_soon()

    async def save_checkpoint(self, position: int) -> None:
        """Send this stage's state (after `position` steps) to the coordinator's store."""
        stage = self.stage
        blob = await self.compute.run(OTHER, stage.checkpoint_blob)
        path = await self.coordinator.put_checkpoint(self.worker_id, position, stage.spec, blob,
                                                     self.run.pipeline.chunk_bytes)
        log.info("checkpointed stage %s at step %d (%.1f MB) -> %s", stage.spec, position, len(blob) / 1e6, path)

    async def _follow_step(self, state: cpb.RunState) -> None:
        stage = self.stage
        if stage is None or self._status == cpb.LOADING or self.loaded_epoch != state.restore_epoch:
            return
        step, attempt = state.step, state.attempt
        if state.phase == cpb.OPEN:
            await self.compute.run(OTHER, lambda: stage.admit(step, attempt) if stage.last_applied < step else None)
        elif state.phase == cpb.ACCUMULATED and (step, attempt, False) not in self._reported:
            if self.driver is not None:
                await self.driver.idle()
            norm_sq = await self.compute.run(OTHER, stage.grad_norm_sq)
            if await self.coordinator.report(self.worker_id, step, attempt, False, norm_sq):
                self._reported.add((step, attempt, False))
        elif state.phase == cpb.APPLYING and (step, attempt, True) not in self._reported:
            if stage.last_applied < step:
                ok = await self.compute.run(OTHER, lambda: stage.apply_step(step, state.global_grad_norm))
                if not ok:
                    log.warning("step %d: global gradient norm %s is not finite; update skipped", step,
                                state.global_grad_norm)
                every = self.run.train.checkpoint_every
                if every and (step + 1) % every == 0:
                    # Before reporting: the step closes only once every stage is in the store.
                    await self.save_checkpoint(step + 1)
            if await self.coordinator.report(self.worker_id, step, attempt, True):
                self._reported.add((step, attempt, True))
        elif state.phase == cpb.DONE and (step, -1, True) not in self._reported:
            self._reported.add((step, -1, True))
            print(f"gptjt-worker: run finished at step {step}; serving stage state until stopped", flush=True)
