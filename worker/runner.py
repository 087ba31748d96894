"""The worker's supervisor: join, take the assigned stage, serve it, follow the step protocol, drain, leave."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from gptjt_core.background import start_background
from gptjt_core.config import RunConfig, from_dict
from gptjt_core.model import StageSpec, model_config_for
from gptjt_core.precision import resolve_precision
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import stage_pb2_grpc as spb_grpc

from .averaging import RoundResult, sum_alone
from .compute import OTHER, ComputeQueue
from .downstream import DownstreamSender
from .faults import faults_from_env
from .link_codecs import LinkCodecChooser
from .link_probe import LinkProber
from .membership import RETRYABLE, CoordinatorClient
from .pipeline import Stage0Driver
from .probe import measure_block_tflops, probe_device
from .routing import NextStageRouter
from .service import Serving, StageService
from .simulated_device import ComputePacer, SimulatedDevice
from .stage import StageRunner
from .transport import GRPC_OPTIONS, LinkCounters, StageClient

log = logging.getLogger("gptjt.worker")

LOAD_RETRY_S = 120.0  # how long loading a stage waits out an unreachable coordinator


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
    simulate_device: str = ""
    """TFLOPS:MEMORY_GB: report this device and compute at its pace (tests and benchmarks only)."""


# Phases in which a stage's weights and optimizer state are still those the step started from
# (APPLYING changes them).
_WEIGHTS_UNCHANGED = (cpb.WAITING, cpb.OPEN, cpb.ACCUMULATED, cpb.AVERAGING)


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
        self.downstream: DownstreamSender | None = None
        self.driver: Stage0Driver | None = None
        self._status = cpb.STANDBY
        self._reported: set[tuple[int, int, int]] = set()  # (step, attempt, report kind)
        self.router = NextStageRouter()
        self.dht_peers: list[str] = []  # the coordinator's hivemind DHT, when the run has replicas
        self.averager = None  # StageAverager of our stage and layer range
        self._failed_rounds = 0  # in a row, since the averager was built
        self.averager_error = ""  # why the last attempt to start one failed
        self._isolated = False  # fault injection: isolate-averaging
        self._averaging_bytes_before = 0  # sent by averagers of stages this worker held earlier
        self._averaging: asyncio.Task | None = None
        self.faults = faults_from_env()
        self.loaded_epoch = -1  # the restore epoch whose state self.stage holds
        self.failed = False  # a loop crashed: the process exits non-zero
        # The coordinator no longer knows us (we missed heartbeats: a stall, a partition): the
        # process joins again as a new worker unless --no-rejoin.
        self.declared_dead = False
        self._state_changed = asyncio.Event()
        self._heartbeat_now = asyncio.Event()
        self._assignment_lock = asyncio.Lock()  # join reply and Watch may both deliver one
        self.simulated: SimulatedDevice | None = None
        self._device_update: dict | None = None  # device figures for the next heartbeat
        self._coordinator_rtt_ms = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    async def main(self) -> None:
        o = self.options
        if o.threads:
            torch.set_num_threads(o.threads)
        simulated = SimulatedDevice.parse(o.simulate_device) if o.simulate_device else None
        # The join reports an fp32 figure (the run's dtype is not known yet); the first
        # heartbeat after it carries the rate measured at the run's compute dtype.
        device = simulated.device_info("fp32") if simulated else probe_device(o.device)
        self.simulated = simulated
        server = grpc.aio.server(options=GRPC_OPTIONS)
        spb_grpc.add_StageServicer_to_server(StageService(self.compute, self.counters, self._serving), server)
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
        self.client = StageClient(self.counters, self.run.pipeline.chunk_bytes, link=self.run.link)
        self.link_codecs = LinkCodecChooser(self.run.pipeline, self.run.link)
        self.downstream = DownstreamSender(self.router, self.link_codecs, self.client, self.coordinator, self.worker_id)
        self.prober = LinkProber(self.client, self.run.scheduler.probe_max_age_s)
        self.dht_peers = list(reply.dht_peers)
        a = reply.assignment
        where = (f"stage {a.stage} of {a.num_stages} (layers {a.start_layer}-{a.end_layer})" if a.stage >= 0
                 else "standby (every stage has a worker)")
        print(f"gptjt-worker: joined {o.coordinator} as {self.worker_id}, {where}; serving on {self.address} "
              f"({device['kind']}, {device['matmul_tflops']:.3f} TFLOP/s measured)", flush=True)
        measuring = asyncio.create_task(self._measure_in_background(device))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_drain)
        tasks = [asyncio.create_task(self._heartbeat_loop(reply.heartbeat_interval_s)),
                 asyncio.create_task(self._watch_loop()), measuring]
        for task in tasks:
            task.add_done_callback(self._on_task_done)
        self.assignment = reply.assignment  # the stage is loaded when the first RunState says from what
        await self.stopping.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if self.driver is not None:
                await self.driver.stop()
            if self._averaging is not None:
                self._averaging.cancel()
                await asyncio.gather(self._averaging, return_exceptions=True)
            await self.client.close()
            await self.coordinator.close()
            await server.stop(grace=0.5)
            await asyncio.to_thread(self.compute.close)
        finally:  # the sidecar is not a daemon: it must be told to stop whatever failed above
            if self.averager is not None:
                await asyncio.to_thread(self.averager.shutdown)
            # The driver points back at this runner: without this the stage (weights, optimizer
            # state, averaging buffers) would wait for the cycle collector while a re-join
            # loads the next one on the same device.
            self.driver = self.stage = self.averager = None

    async def _measure_in_background(self, joined_with: dict) -> None:
        """Re-measure at the run's dtype while the stage loads; the next heartbeat carries it.
        A probe that fails leaves the join's figures in place (the plan is only less exact).
        With scheduler.placement 'even' nothing plans with the figures: the join's are
        confirmed as they are, and the CPU goes to loading the stage instead."""
        if self.run.scheduler.placement != "cost-model":
            self._device_update = dict(joined_with)
            self._heartbeat_soon()
            return
        try:
            self._device_update = await self._measure_at_run_dtype()
        except (RuntimeError, ValueError) as e:
            log.warning("could not measure this device at the run's dtype (%s); the scheduler keeps the "
                        "join's fp32 figures", e)
            return
        self._heartbeat_soon()

    async def _measure_at_run_dtype(self) -> dict:
        """The device figures the scheduler plans with: the matmul rate at the run's compute dtype."""
        precision = resolve_precision(self.run.train.precision, self.options.device)
        if self.simulated is not None:
            return {**self.simulated.device_info(precision.name), "block_tflops": self.simulated.tflops}
        device = await asyncio.to_thread(probe_device, self.options.device, precision.compute_dtype)
        t = self.run.train
        config = model_config_for(self.run.model.source, self.run.model.attn_implementation)
        device["block_tflops"] = await asyncio.to_thread(measure_block_tflops, config, self.options.device,
                                                         precision, t.micro_batch * t.seq_len, t.seq_len)
        log.info("measured %.4g TFLOP/s on one block of the run's model (matmul peak %.4g) at %s",
                 device["block_tflops"], device["matmul_tflops"], precision.name)
        return device

    # -- what the stage service and the stage-0 driver see of this worker ------------
    def _serving(self) -> Serving | None:
        """What the stage service answers with now (nothing until the join names the run)."""
        if self.downstream is None:
            return None
        return Serving(self.stage, self.assignment.stage if self.assignment is not None else None,
                       self.loaded_epoch >= 0, self.run.pipeline, self.downstream)

    def _open_for_work(self) -> bool:
        """The run takes micro-batches from this worker now: an open step, not paused, we are a
        member and not leaving."""
        state = self.state
        return (state is not None and state.phase == cpb.OPEN and not state.paused and not self.leaving
                and bool(state.assignment.member))

    def _stage0_driver(self) -> Stage0Driver:
        return Stage0Driver(self.run, self.compute, self.downstream, self.coordinator, self.worker_id,
                            lambda: self.stage, self._open_for_work)

    def _on_task_done(self, task: asyncio.Task) -> None:
        """A crashed heartbeat or watch loop would leave a zombie worker: stop loudly instead."""
        if task.cancelled() or task.exception() is None:
            return
        self._fail(task.exception())

    def _fail(self, error: BaseException) -> None:
        log.error("worker loop failed: %r; stopping (the coordinator will re-issue our work)", error, exc_info=error)
        self.failed = True
        self.stopping.set()

    def request_drain(self) -> None:
        if not self.leaving:
            log.info("drain requested: finishing the current step, then leaving")
            self.leaving = True
            start_background(self._drain_and_leave(), "drain", log, on_error=self._fail)

    async def _drain_and_leave(self) -> None:
        state = self.state
        drain_step = state.step if state is not None else -1
        deadline = time.monotonic() + self.options.drain_timeout_s
        self._status = cpb.DRAINING
        # Keep serving until the step that was open when the drain began has closed, so its
        # work is not redone; a paused run closes no step, so there is nothing to wait for.
        while (self.stage is not None and self.state is not None and self.state.phase not in (cpb.DONE, cpb.WAITING)
               and self.state.step <= drain_step and not self.state.paused and time.monotonic() < deadline):
            self._state_changed.clear()
            try:
                await asyncio.wait_for(self._state_changed.wait(), timeout=0.5)
            except TimeoutError:
                pass
        if self.driver is not None:
            await self.driver.stop()  # hands back anything still leased
        if (self.stage is not None and self.state is not None and self.state.phase in _WEIGHTS_UNCHANGED
                and self.stage.position == self.state.step and not self.state.assignment.peer_addresses):
            # The stage's last replica, with the weights the open step started from: leave them
            # in the store so a newcomer continues from this step (only its partial work is
            # redone) instead of the run rolling back to the last checkpoint.
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
                       "micro_batches": mbs, **self.link_codecs.metrics(),
                       "averaging_bytes": self._averaging_bytes_before
                       + (self.averager.bytes_sent if self.averager is not None else 0)}
            last_t, last_busy, last_mb = now, busy, mbs
            position = self.stage.position if self.stage is not None and self.loaded_epoch >= 0 else -1
            device, links = self._device_update, self.prober.take()
            sent = time.monotonic()
            try:
                known = await self.coordinator.heartbeat(
                    self.worker_id, self._status, metrics, self.loaded_epoch, position, device=device, links=links,
                    rtt_ms=self._coordinator_rtt_ms,
                    dht_maddrs=self.averager.visible_maddrs if self.averager is not None else [])
                self._coordinator_rtt_ms = (time.monotonic() - sent) * 1e3
                if self._device_update is device:  # not one measured while the call was out
                    self._device_update = None
            except grpc.aio.AioRpcError as e:
                log.warning("heartbeat failed: %s", e.code().name)
                self.prober.results[:0] = links  # measurements are sent with the next heartbeat
                known = True
            if not known:
                log.error("the coordinator declared this worker dead (missed heartbeats); leaving the run")
                # A worker that is leaving is forgotten on purpose (Leave): that is no reason to re-join.
                self.declared_dead = not self.leaving
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
            if state.drain and not self.leaving:
                self.request_drain()  # the operator asked (gptjt drain, the dashboard)
            self.router.update(list(state.assignment.next_addresses),
                               forgive=previous is None or previous.plan_version != state.plan_version)
            self.link_codecs.forget_except(list(state.assignment.next_addresses))
            if state.measure_links:
                self.prober.request(list(state.measure_links))
            if (previous is None or previous.plan_version != state.plan_version
                    or previous.restore_epoch != state.restore_epoch or self._behind(state)):
                await self._load_patiently(state)
                if self.driver is not None:
                    self.driver.on_plan_change()
            await self._follow_step(state)
            if self.driver is not None:
                self.driver.wake.set()

    async def _load_patiently(self, state: cpb.RunState) -> None:
        """Apply the assignment, retrying while the coordinator is briefly unreachable (a restart
        takes seconds) for up to LOAD_RETRY_S; any other failure (the store missing a file) three
        times. Then stop loudly: the coordinator times us out and reassigns the stage."""
        deadline, failures = time.monotonic() + LOAD_RETRY_S, 0
        while True:
            try:
                await self._apply_assignment(state.assignment, state)
                return
            except grpc.aio.AioRpcError as e:
                transient = e.code() in RETRYABLE
                failures += not transient
                log.error("could not load stage %d (%s): %s %s", state.assignment.stage,
                          "the coordinator is unreachable; retrying" if transient else f"try {failures} of 3",
                          e.code().name, e.details())
                if failures >= 3 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(2.0)

    # -- assignment and the step protocol ----------------------------------------------
    def _behind(self, state: cpb.RunState) -> bool:
        """A joiner whose copy of the stage is older than the run's step: fetch it again."""
        return (self.stage is not None and self.loaded_epoch == state.restore_epoch and not state.assignment.member
                and self.stage.position < state.step and bool(state.assignment.peer_addresses)
                and state.phase != cpb.DONE)

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
            if a.standby_reason and (old is None or old.standby_reason != a.standby_reason):
                log.info("on standby: %s", a.standby_reason)
            self.stage = None
            await self._drop_averager()  # a stage taken up again gets a fresh one (fresh DHT peers too)
            self._status = cpb.STANDBY
            return
        spec = StageSpec(a.start_layer, a.end_layer, embed=a.embed, head=a.head)
        if self.stage is not None and self.stage.spec == spec:
            if self.loaded_epoch == state.restore_epoch and not self._behind(state):
                return
            if self.stage.position == state.restore_step:
                # Our state is the one the run wants: drop partial work, keep the weights.
                await self.compute.run(OTHER, self.stage.reset_to_position)
                self.loaded_epoch = state.restore_epoch
                self._heartbeat_soon()
                return
        if self.averager is not None and self.averager.key != (a.stage, spec.start, spec.end):
            log.info("stage %d now holds layers %d-%d (its averager was built for stage %d, layers %d-%d): "
                     "a new averager for the new range", a.stage, spec.start, spec.end, *self.averager.key)
            await self._drop_averager()  # its buffers have the old range's shapes, its group the old key
        self._status = cpb.LOADING
        self._heartbeat_soon()
        t0 = time.perf_counter()
        position = state.restore_step
        if a.peer_addresses:
            # A replica holds the run's current state: copy it, optimizer included, so this one is
            # bit-identical to it and can take part from the next step.
            log.info("copying stage %d from a replica (we hold epoch %d position %s; the run is at epoch %d "
                     "step %d, %s)", a.stage, self.loaded_epoch, self.stage.position if self.stage else None,
                     state.restore_epoch, state.step, cpb.StepPhase.Name(state.phase))
            fetched = await self._fetch_from_peer(list(a.peer_addresses))
            if fetched is None:
                self._status = cpb.READY if self.stage is not None else cpb.STANDBY
                return  # try again on the next RunState
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
        self.stage = await self.compute.run(OTHER, lambda: StageRunner(self.run, spec, self.options.device,
                                                                       checkpoint, position))
        if self.simulated is not None:
            self.stage.pacer = ComputePacer(self.simulated, self.stage.matmul_params())
        self.loaded_epoch = state.restore_epoch
        if self.dht_peers and self.averager is None:
            await self._build_averager(a, spec, state)
        log.info("stage %d ready at step %d in %.1fs", a.stage, position, time.perf_counter() - t0)
        if spec.embed and self.driver is None:
            self.driver = self._stage0_driver()
            start_background(self.driver.run(self.stopping), "the stage-0 driver", log, on_error=self._fail)
        self._status = cpb.DRAINING if self.leaving else cpb.READY
        self._heartbeat_soon()

    async def _build_averager(self, a: cpb.StageAssignment, spec: StageSpec, state: cpb.RunState) -> None:
        """A hivemind averager for this stage and layer range, bootstrapped from the DHT peers the
        coordinator names now (its own and live workers': the run's one network)."""
        from .averaging import StageAverager

        avg = self.run.averaging
        peers = list(state.dht_peers) or self.dht_peers
        try:
            self.averager = await asyncio.to_thread(
                StageAverager, peers, self.run.name, a.stage, [p.shape for p in self.stage.model.parameters()],
                max_group=self.run.pipeline.replicas_per_stage, compression=avg.compression,
                matchmaking_s=avg.matchmaking_s, timeout=avg.timeout_s,
                host=self.address.rsplit(":", 1)[0].strip("[]"), layers=(spec.start, spec.end))
        except RuntimeError as e:  # the round reports it, and the next one tries again
            self.averager_error = str(e)
            log.error("could not start the averager of stage %d: %s; trying again at the next round", a.stage, e)
            return
        self.averager_error = ""
        self._failed_rounds = 0
        self._heartbeat_soon()  # its DHT address reaches the coordinator for others to bootstrap from

    async def _drop_averager(self) -> None:
        if self.averager is not None:
            averager, self.averager = self.averager, None
            self._averaging_bytes_before += averager.bytes_sent
            await asyncio.to_thread(averager.shutdown)

    async def _fetch_from_peer(self, addresses: list[str]) -> tuple[dict, int] | None:
        from safetensors.torch import load

        for address in addresses:
            try:
                header, blob = await self.client.fetch_state(address)
            except (grpc.aio.AioRpcError, RuntimeError) as e:
                log.warning("could not fetch the stage state from %s: %s", address,
                            e.details() if isinstance(e, grpc.aio.AioRpcError) else e)
                continue
            log.info("fetched stage state at step %d from replica %s (%.1f MB)", header.position, address,
                     len(blob) / 1e6)
            return await asyncio.to_thread(load, blob), header.position
        return None

    async def save_checkpoint(self, position: int) -> None:
        """Send this stage's state (after `position` steps) to the coordinator's store."""
        stage = self.stage
        blob = await self.compute.run(OTHER, stage.checkpoint_blob)
        progress = None
        if self.faults.fires("die-checkpoint", position):
            log.warning("fault injection: SIGKILL halfway through uploading the checkpoint of step %d", position)

            def progress(sent: int) -> None:
                if sent >= len(blob) // 2:
                    os.kill(os.getpid(), signal.SIGKILL)
        path = await self.coordinator.put_checkpoint(self.worker_id, position, stage.spec, blob,
                                                     self.run.pipeline.chunk_bytes, progress)
        log.info("checkpointed stage %s at step %d (%.1f MB) -> %s", stage.spec, position, len(blob) / 1e6, path)

    async def _follow_step(self, state: cpb.RunState) -> None:
        stage = self.stage
        if stage is None or self._status == cpb.LOADING or self.loaded_epoch != state.restore_epoch:
            return
        step, attempt, a = state.step, state.attempt, state.assignment
        if state.phase == cpb.DONE:
            if (step, -1, cpb.APPLIED) not in self._reported:
                self._reported.add((step, -1, cpb.APPLIED))
                self._heartbeat_soon()  # the final metrics reach the coordinator now
                print(f"gptjt-worker: run finished at step {step}; serving stage state until stopped", flush=True)
            return
        if not a.member:
            return  # a replica that joined mid-step takes part from the next step
        if state.phase == cpb.OPEN:
            await self.compute.run(OTHER, lambda: stage.admit(step, attempt) if stage.last_applied < step else None)
        elif state.phase == cpb.ACCUMULATED and (step, attempt, cpb.CONTRIBUTION) not in self._reported:
            if self.driver is not None:
                await self.driver.idle()
            self._inject_gradient_faults(stage, step)
            norm_sq, mbs = await self.compute.run(OTHER, lambda: (stage.grad_norm_sq(), stage.step_micro_batches))
            if await self.coordinator.report(self.worker_id, step, attempt, cpb.CONTRIBUTION, norm_sq,
                                             micro_batches=mbs):
                self._reported.add((step, attempt, cpb.CONTRIBUTION))
        elif state.phase == cpb.AVERAGING and (step, attempt, cpb.AVERAGED) not in self._reported:
            if self._averaging is None or self._averaging.done():
                self._averaging = asyncio.create_task(self._average(stage, step, attempt))
                self._averaging.add_done_callback(self._on_task_done)  # a crash stops the worker loudly
        elif state.phase == cpb.APPLYING and (step, attempt, cpb.APPLIED) not in self._reported:
            if stage.last_applied < step:
                if stage.local_steps:
                    contribute = not a.contributors or self.worker_id in a.contributors
                    total = self.run.train.micro_batches_per_step
                    ok = await self.compute.run(OTHER, lambda: stage.apply_local(step, state.global_grad_norm,
                                                                                 contribute, total))
                else:
                    ok = await self.compute.run(OTHER, lambda: stage.apply_step(step, state.global_grad_norm))
                if not ok:
                    log.warning("step %d: global gradient norm %s is not finite; update skipped", step,
                                state.global_grad_norm)
                every = self.run.train.checkpoint_every
                if every and (step + 1) % every == 0 and a.checkpoint_writer:
                    # Before reporting: the step closes only once every stage is in the store.
                    await self.save_checkpoint(step + 1)
            digest = await self.compute.run(OTHER, stage.state_digest)
            if await self.coordinator.report(self.worker_id, step, attempt, cpb.APPLIED, state_digest=digest):
                self._reported.add((step, attempt, cpb.APPLIED))

    def _inject_gradient_faults(self, stage: StageRunner, step: int) -> None:
        """GPTJT_FAULTS poison@N / nan@N (tests and drills only; see worker/faults.py)."""
        for kind, value in (("poison", 1e6), ("nan", float("nan"))):
            if self.faults.fires(kind, step):
                log.warning("fault injection: %s in this replica's gradient at step %d", kind, step)
                for g in stage.gradients():
                    g.mul_(value)

    async def _average(self, stage: StageRunner, step: int, attempt: int) -> None:
        """Sum the stage's gradients with its replicas, retrying with whoever is still alive
        until it works or the coordinator moves the step on (it restarts a stuck step)."""
        total = self.run.train.micro_batches_per_step
        while True:
            state = self.state
            if state is None or (state.phase, state.step, state.attempt) != (cpb.AVERAGING, step, attempt):
                return
            a = state.assignment
            expected, members = len(a.peer_ids), list(a.peer_ids)
            contribute = self.worker_id in a.contributors
            if not contribute and not stage.local_steps:
                log.warning("step %d: the coordinator refused this replica's gradient; receiving the others' sum",
                            step)
            if expected > 1 and self.averager is None:
                async with self._assignment_lock:
                    if self.averager is None and self.stage is stage and (state.dht_peers or self.dht_peers):
                        await self._build_averager(a, stage.spec, state)
                if self.averager is None:
                    await self._round_failed(state, step, attempt, "this replica has no averager: "
                                             + (self.averager_error or "the coordinator named no DHT peers"))
                    await asyncio.sleep(1.0)
                    continue
            if self.faults.fires("isolate-averaging", step):
                log.warning("fault injection: from step %d on, this replica's averaging rounds carry a tag no "
                            "other replica uses", step)
                self._isolated = True
            tag = (step, attempt, "isolated") if self._isolated else (step, attempt)
            if self.faults.fires("die-averaging", step):
                delay = self.run.averaging.matchmaking_s / 2  # while the group is being formed
                log.warning("fault injection: SIGKILL in %.1f s, inside the averaging round of step %d", delay, step)
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            mbs = stage.step_micro_batches

            def round_(expected=expected, mbs=mbs, contribute=contribute, members=members, tag=tag):
                if stage.attempt != (step, attempt):  # the step moved on while this waited its turn
                    return RoundResult(False, 0, 0.0), 0.0
                if stage.local_steps:  # an outer step: the replicas' mean pseudo-gradient, applied in APPLYING
                    deltas = stage.pseudo_gradients()
                    # The pseudo-gradient sums inner steps already accepted; this step's verdict on
                    # the replica's new gradient does not apply to it, only its own finiteness does.
                    finite = all(bool(torch.isfinite(d).all()) for d in deltas)
                    if not finite:
                        log.error("step %d: this replica's pseudo-gradient is not finite; it receives the "
                                  "others' mean without contributing", step)
                    if expected > 1:
                        res = self.averager.sum_gradients(deltas, 1, 1, expected, finite, tag=tag,
                                                          worker_id=self.worker_id, members=members)
                    else:
                        res = sum_alone(deltas, 1 if finite else 0, 1)
                    if not res.summed or stage.attempt != (step, attempt):
                        return RoundResult(False, res.group_size, 0.0, res.detail), 0.0
                    stage.pending_outer = deltas
                    return res, float(sum(torch.linalg.vector_norm(d) ** 2 for d in deltas))
                grads = stage.gradients()
                if expected > 1:
                    res = self.averager.sum_gradients(grads, mbs, total, expected, contribute, tag=tag,
                                                      worker_id=self.worker_id, members=members)
                else:
                    res = sum_alone(grads, mbs if contribute else 0, total)
                return res, (stage.grad_norm_sq() if res.summed else 0.0)

            result, norm_sq = await self.compute.run(OTHER, round_)
            if result.summed and stage.attempt == (step, attempt):
                if stage.local_steps:
                    log.info("step %d: outer step: averaged the pseudo-gradients of %d replica(s)", step,
                             result.group_size)
                else:
                    log.info("step %d: summed gradients of %d replica(s), %g of %d micro-batches", step,
                             result.group_size, result.weight, total)
                if await self.coordinator.report(self.worker_id, step, attempt, cpb.AVERAGED, norm_sq,
                                                 group_weight=result.weight):
                    self._reported.add((step, attempt, cpb.AVERAGED))
                self._failed_rounds = 0
                return
            await self._round_failed(state, step, attempt, result.detail)
            await asyncio.sleep(0.2)

    async def _round_failed(self, state: cpb.RunState, step: int, attempt: int, detail: str) -> None:
        """Tell the coordinator why (its stall diagnosis names the cause); after
        averaging.rebuild_after_failures failures in a row, rebuild the averager from the DHT
        peers the coordinator names now: a peer cut off from the others finds them again."""
        if not detail:
            return  # the step moved on while the round waited its turn: nothing failed
        self._failed_rounds += 1
        await self.coordinator.report(self.worker_id, step, attempt, cpb.AVERAGING_FAILED, detail=detail)
        if self._failed_rounds >= self.run.averaging.rebuild_after_failures and self.stage is not None:
            log.warning("averaging failed %d times in a row (last: %s); rebuilding the averager from %d DHT peer(s)",
                        self._failed_rounds, detail, len(state.dht_peers))
            async with self._assignment_lock:  # not while the Watch loop (re)loads the stage
                if self.stage is not None and self.averager is not None:
                    await self._drop_averager()
                    await self._build_averager(state.assignment, self.stage.spec, state)

