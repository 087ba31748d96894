"""The worker's supervisor: join, take the assigned stage, serve it, follow the step protocol, drain, leave."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time

import grpc
import torch

from gptjt_core.background import start_background
from gptjt_core.config import RunConfig, from_dict
from gptjt_core.dht_auth import dht_public_key, new_dht_key
from gptjt_core.heartbeat_pacing import wait_for_next_heartbeat
from gptjt_core.model import StageSpec
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import stage_pb2 as spb

from .averager_keeper import AveragerKeeper, dht_credentials
from .check_weights import CheckWeights
from .compute import OTHER, ComputeQueue
from .downstream import DownstreamSender
from .drain import drain_and_leave
from .faults import faults_from_env
from .link_codecs import LinkCodecChooser
from .link_probe import LinkProber
from .membership import CoordinatorClient, session_ended
from .options import WorkerOptions
from .pipeline import Stage0Driver
from .probe import BusyRates, figures_for_the_plan, peak_memory_bytes, probe_device
from .relay_tunnel import address_to_announce
from .routing import NextStageRouter, lane_partner
from .service import Serving, StageService
from .simulated_device import SimulatedDevice
from .spot_check import SpotChecker
from .stage import LayerSlice
from .stage_loader import StageLoader, retry_loading
from .stage_tls import PortReservation, StageIdentity, serve_stage
from .step_follower import StepFollower
from .transport import GRPC_OPTIONS, LinkCounters, StageClient
from .watch_reader import WatchReader, act_on_watch, load_unless_reassigned

log = logging.getLogger("gptjt.worker")

class WorkerRunner:
    """One membership of a worker in a run: join, serve the assigned stage, follow the steps, drain, leave."""

    def __init__(self, options: WorkerOptions):
        self.options = options
        self.counters = LinkCounters()
        self.compute = ComputeQueue()
        self.identity = StageIdentity()  # the key and certificate of this worker's stage links
        self.dht_key = new_dht_key()  # the key of its averaging DHT peer; Join gets it a token
        self.tls = False  # link.tls of the run (known after Join)
        self.stopping = asyncio.Event()
        self.leaving = False
        self.worker_id = ""
        self.run: RunConfig | None = None
        self.assignment: cpb.StageAssignment | None = None
        self.stage: LayerSlice | None = None
        self.state: cpb.RunState | None = None
        self.client: StageClient | None = None
        self.downstream: DownstreamSender | None = None
        self.driver: Stage0Driver | None = None
        self.status = cpb.STANDBY  # the WorkerState our heartbeats report
        self.reported_status = -1  # the status the coordinator last acknowledged in a heartbeat
        self.router = NextStageRouter()
        self.dht_peers: list[str] = []  # the run's hivemind DHT, when the run has replicas
        self.averagers: AveragerKeeper | None = None  # the averager of the stage we hold
        self.loader: StageLoader | None = None
        self.follower: StepFollower | None = None
        self.faults = faults_from_env()
        self.loaded_epoch = -1  # the restore epoch whose state self.stage holds
        self.failed = False  # a loop crashed: the process exits non-zero
        # The coordinator no longer knows us (we missed heartbeats: a stall, a partition): the
        # process joins again as a new worker unless --no-rejoin.
        self.declared_dead = False
        self.state_changed = asyncio.Event()
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
        self.simulated = simulated = SimulatedDevice.parse(o.simulate_device) if o.simulate_device else None
        # The join reports an fp32 figure (the run's dtype is not known yet); the first
        # heartbeat after it carries the rate measured at the run's compute dtype.
        device = simulated.device_info("fp32") if simulated else probe_device(o.device)
        host, _, port = o.listen.rpartition(":")
        reservation = PortReservation(host, int(port))  # Join names the address; the server starts after it
        self.address = o.announce or f"{host}:{reservation.port}"
        self.address, tunnel = (await address_to_announce(o.relay, o.token, self.address, reservation)
                                if o.relay else (self.address, None))  # behind NAT: a port of the relay
        credentials = grpc.ssl_channel_credentials(open(o.tls_ca, "rb").read()) if o.tls_ca else None
        self.coordinator = CoordinatorClient(o.coordinator, credentials)
        try:
            reply = await self.coordinator.join(o.token, o.name or socket.gethostname(), self.address, device,
                                                self.identity.public_key_pem, dht_public_key(self.dht_key))
            self.worker_id = reply.worker_id
            self.run = from_dict(RunConfig, json.loads(reply.run_config_json))
            self.tls = self.run.link.tls == "on"
            if self.tls:
                self.identity.adopt(reply.ca_pem, reply.cert_pem)
            server = await serve_stage(f"{host}:{reservation.port}", StageService(self.compute, self.counters,
                                                                                   self._serving, self.faults),
                                       self.identity if self.tls else None, GRPC_OPTIONS)
        finally:
            reservation.release()
        self.client = StageClient(self.counters, self.run.pipeline.chunk_bytes, link=self.run.link,
                                  credentials=self.identity.channel_credentials() if self.tls else None)
        self.link_codecs = LinkCodecChooser(self.run.pipeline, self.run.link)
        self.downstream = DownstreamSender(self.router, self.link_codecs, self.client, self.coordinator, self.worker_id)
        self.prober = LinkProber(self.client, self.run.scheduler.probe_max_age_s, self.link_codecs.probe_measured)
        self.dht_peers = list(reply.dht_peers)
        self.averagers = AveragerKeeper(self.run, self.address.rsplit(":", 1)[0].strip("[]"), self.heartbeat_soon,
                                        dht_credentials(self.dht_key, reply))
        self.loader = StageLoader(self.run, o.device, self.compute, self.client, self.coordinator, simulated)
        self.checker = SpotChecker(self.worker_id, self.compute, self._fetch_evidence, self.coordinator.report_check,
                                   self._stage_for_checks, self.run.train.global_batch,
                                   CheckWeights(self.run, o.device, self.compute, self.coordinator.get_checkpoint))
        self.follower = StepFollower(self.run, self.worker_id, self.compute, self.coordinator, self.averagers,
                                     self.faults, lambda: self.state, self._rebuild_averager, self._on_task_done)
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
                 asyncio.create_task(act_on_watch(self.coordinator.watch(self.worker_id), self._on_run_state)),
                 measuring, asyncio.create_task(self.checker.run())]
        tasks += [asyncio.create_task(tunnel.run(f"{host}:{reservation.port}"))] if tunnel is not None else []
        for task in tasks:
            task.add_done_callback(self._on_task_done)
        self.assignment = reply.assignment  # the stage is loaded when the first RunState says from what
        await self.stopping.wait()
        await self._shut_down(server, tasks)

    async def _shut_down(self, server: grpc.aio.Server, tasks: list[asyncio.Task]) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if self.driver is not None:
                await self.driver.stop()
            await self.follower.stop()
            await self.client.close()
            await self.coordinator.close()
            await server.stop(grace=0.5)
            await asyncio.to_thread(self.compute.close)
        finally:  # the sidecar is not a daemon: it must be told to stop whatever failed above
            await self.averagers.drop()
            # The driver and the follower point back at this runner: without this the stage
            # (weights, optimizer state, averaging buffers) would wait for the cycle collector
            # while a re-join loads the next one on the same device.
            self.driver = self.stage = self.follower = None

    async def _measure_in_background(self, joined_with: dict) -> None:
        """Re-measure at the run's dtype while the stage loads; the next heartbeat carries it."""
        figures = await figures_for_the_plan(self.run, self.options.device, self.simulated, joined_with)
        if figures is not None:
            self._device_update = figures
            self.heartbeat_soon()

    # -- what the stage service and the stage-0 driver see of this worker ------------
    def _serving(self) -> Serving | None:
        """What the stage service answers with now (nothing until the join names the run)."""
        if self.downstream is None:
            return None
        state = self.state
        open_step = (state.step, state.attempt) if state is not None and state.phase == cpb.OPEN else None
        a = state.assignment if state is not None else cpb.StageAssignment()  # empty: nobody may call
        upstream, fetchers = frozenset(a.upstream_ids), frozenset(a.fetcher_ids)
        replicas, verifiers = frozenset(a.peer_ids), frozenset(a.verifier_ids)
        return Serving(self.stage, self.assignment.stage if self.assignment is not None else None,
                       self.loaded_epoch >= 0, self.run.pipeline, self.downstream, open_step,
                       upstream if self.tls else None, fetchers if self.tls else None, replicas if self.tls else None,
                       verifiers, self.loss_scale_of(*open_step) if open_step is not None else 1.0)

    def loss_scale_of(self, step: int, attempt: int) -> float:
        """The loss scale of (step, attempt) when it is the one open (1.0 otherwise, or from a
        coordinator that sends none): what the last stage multiplies its loss by."""
        state = self.state
        if state is None or (state.step, state.attempt) != (step, attempt) or state.phase != cpb.OPEN:
            return 1.0
        return state.loss_scale or 1.0

    def _open_for_work(self) -> bool:
        """The run takes micro-batches from this worker now: an open step, not paused, we are a
        member and not leaving."""
        state = self.state
        return (state is not None and state.phase == cpb.OPEN and not state.paused and not self.leaving
                and bool(state.assignment.member))

    def _on_task_done(self, task: asyncio.Task) -> None:
        """A crashed heartbeat or watch loop would leave a zombie worker: stop loudly instead."""
        if task.cancelled() or task.exception() is None:
            return
        self._fail(task.exception())

    def _fail(self, error: BaseException) -> None:
        if session_ended(error):
            # Any call may be the first to hear that the coordinator ended our session (the
            # heartbeat loop, a Watch, a lease, a checkpoint upload after a stall): each means
            # the same thing, and none is a crash.
            self._session_over(error.details())
            return
        log.error("worker loop failed: %r; stopping (the coordinator will re-issue our work)", error, exc_info=error)
        self.failed = True
        self.stopping.set()

    def request_drain(self) -> None:
        if not self.leaving:
            log.info("drain requested: finishing the current step, then leaving")
            self.leaving = True
            start_background(drain_and_leave(self), "drain", log, on_error=self._fail)

    # -- coordinator streams -----------------------------------------------------------
    async def _heartbeat_loop(self, interval: float) -> None:
        rates = BusyRates()
        while True:
            metrics = rates.since_last(self.compute.busy_seconds, self.stage.micro_batches if self.stage else 0)
            metrics.update(bytes_sent=self.counters.sent, bytes_received=self.counters.received,
                           averaging_bytes=self.averagers.bytes_sent, peak_memory_bytes=peak_memory_bytes(self.options.device),
                           **self.link_codecs.metrics())
            position = self.stage.position if self.stage is not None and self.loaded_epoch >= 0 else -1
            device, links = self._device_update, self.prober.take()
            sent, status = time.monotonic(), self.status
            try:
                known, checks = await self.coordinator.heartbeat(
                    self.worker_id, status, metrics, self.loaded_epoch, position, device=device, links=links,
                    rtt_ms=self._coordinator_rtt_ms, dht_maddrs=self.averagers.maddrs)
                self._coordinator_rtt_ms = (time.monotonic() - sent) * 1e3
                if self._device_update is device:  # not one measured while the call was out
                    self._device_update = None
                if known:
                    self.reported_status = status
                    self.checker.take(checks)
            except grpc.aio.AioRpcError as e:
                if session_ended(e):
                    self._session_over(e.details())
                    return
                log.warning("heartbeat failed: %s", e.code().name)
                self.prober.results[:0] = links  # measurements are sent with the next heartbeat
                known = True
            if not known:
                self._session_over("the coordinator no longer knows this worker")
                return
            await wait_for_next_heartbeat(self._heartbeat_now, interval, sent)

    def _stage_for_checks(self) -> tuple[int, LayerSlice | None]:
        """(assigned stage index, the stage if its state is loaded) for a spot check."""
        index = self.assignment.stage if self.assignment is not None else -1
        return index, self.stage if self.loaded_epoch >= 0 and self.status != cpb.LOADING else None

    async def _fetch_evidence(self, check: cpb.SpotCheck) -> spb.EvidenceReply:
        """A spot check's evidence, from the checked replica's stage server (mutual TLS: it must
        answer as the worker the coordinator named)."""
        self.client.learn([check.address], [check.worker_id])
        return await self.client.fetch_evidence(check.address, check.ticket_id, check.attempt, timeout=60)

    def _session_over(self, why: str) -> None:
        """The coordinator ended our session: stop, and join again as a new worker (worker/cli.py)."""
        if self.stopping.is_set():
            return
        log.error("the coordinator ended this worker's session (%s); leaving the run", why)
        # A worker that is leaving is forgotten on purpose (Leave): that is no reason to re-join.
        self.declared_dead = not self.leaving
        self.stopping.set()

    def heartbeat_soon(self) -> None:
        """State changes (loading -> ready) reach the coordinator now, not at the next tick."""
        self._heartbeat_now.set()

    async def _on_run_state(self, state: cpb.RunState, reader: WatchReader) -> None:
        previous = self.state
        self.state = state
        self.state_changed.set()
        if state.drain and not self.leaving:
            self.request_drain()  # the operator asked (gptjt drain, the dashboard)
        if self.checker.wants(state.newest_check):
            self.heartbeat_soon()  # its reply hands the check over (coordinator/ledger/assignments.py)
        a = state.assignment
        for addresses, ids in ((a.next_addresses, a.next_ids), (a.peer_addresses, a.peer_address_ids),
                               (state.measure_links, state.measure_link_ids)):
            self.client.learn(addresses, ids)  # who must answer at each address (TLS links)
        self.router.update(list(a.next_addresses), lane=lane_partner(self.worker_id, a, self.run.averaging.mode),
                           forgive=previous is None or previous.plan_version != state.plan_version)
        self.link_codecs.forget_except(list(state.assignment.next_addresses))
        self.prober.request(list(state.measure_links))
        if (previous is None or previous.plan_version != state.plan_version or self.status == cpb.LOADING
                or previous.restore_epoch != state.restore_epoch or self._behind(state)):
            if not await load_unless_reassigned(self._load_patiently(state), state, reader,
                                                lambda: self.loader.copying):
                return  # a newer RunState assigns something else: it is read next
            if self.driver is not None:
                self.driver.on_plan_change()
        await self._follow_step(state)
        if self.driver is not None:
            self.driver.wake.set()

    async def _follow_step(self, state: cpb.RunState) -> None:
        stage = self.stage
        if stage is None or self.status == cpb.LOADING or self.loaded_epoch != state.restore_epoch:
            return
        await self.follower.follow(stage, state, self.driver.idle if self.driver is not None else None,
                                   self._finished)

    def _finished(self) -> None:
        self.heartbeat_soon()  # the final metrics reach the coordinator now
        print(f"gptjt-worker: run finished at step {self.state.step}; serving stage state until stopped", flush=True)

    async def _load_patiently(self, state: cpb.RunState) -> None:
        await retry_loading(lambda: self._apply_assignment(state.assignment, state), state.assignment.stage)

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
            await self.averagers.drop()  # a stage taken up again gets a fresh one (fresh DHT peers too)
            self.status = cpb.DRAINING if self.leaving else cpb.STANDBY
            return
        self.checker.stored.drop()  # a standby's stage for checks: this worker's memory is its own stage's now
        spec = StageSpec(a.start_layer, a.end_layer, embed=a.embed, head=a.head)
        if self.stage is not None and self.stage.spec == spec:
            behind = self._behind(state)
            current = self.loaded_epoch == state.restore_epoch and not behind
            # at the restore step, and the run still there (one that missed step 0 loading must copy)
            if current or (self.stage.position == state.restore_step and not behind):
                if not current:  # our state is the one the run wants: drop partial work, keep the weights
                    await self.compute.run(OTHER, self.stage.reset_to_position)
                    self.loaded_epoch = state.restore_epoch
                # READY again too after a newer RunState cancelled a load of another range (watch_reader.py)
                if not current or self.status == cpb.LOADING:
                    self.status = cpb.DRAINING if self.leaving else cpb.READY
                    self.heartbeat_soon()
                return
        if self.averagers.averager is not None and not self.averagers.fits(a.stage, spec):
            log.info("stage %d now holds layers %d-%d (its averager was built for stage %d, layers %d-%d): "
                     "a new averager for the new range", a.stage, spec.start, spec.end, *self.averagers.averager.key)
            await self.averagers.drop()  # its buffers have the old range's shapes, its group the old key
        self.status = cpb.LOADING
        self.heartbeat_soon()
        t0 = time.perf_counter()
        stage = await self.loader.load(a, spec, state, self.stage, self.loaded_epoch)
        if stage is None:
            self.status = cpb.DRAINING if self.leaving else cpb.READY if self.stage is not None else cpb.STANDBY
            return  # no replica could give the state: try again on the next RunState
        self.stage, self.loaded_epoch = stage, state.restore_epoch
        if self.dht_peers and self.averagers.averager is None:
            await self.averagers.build(a.stage, spec, stage.averaged_shapes(),
                                       list(state.dht_peers) or self.dht_peers)
        log.info("stage %d ready at step %d in %.1fs", a.stage, stage.position, time.perf_counter() - t0)
        if spec.embed and self.driver is None:
            self.driver = Stage0Driver(self.run, self.compute, self.downstream, self.coordinator, self.worker_id,
                                       lambda: self.stage, self._open_for_work, self.loss_scale_of)
            start_background(self.driver.run(self.stopping), "the stage-0 driver", log, on_error=self._fail)
        self.status = cpb.DRAINING if self.leaving else cpb.READY
        self.heartbeat_soon()

    async def _rebuild_averager(self, state: cpb.RunState, stage: LayerSlice, fresh: bool) -> None:
        """(Re)build the averager of `stage` if this worker still holds it; fresh: drop the one it
        has first (rounds kept failing). Under the assignment lock: not while the Watch loop loads."""
        async with self._assignment_lock:
            if self.stage is not stage:
                return
            if fresh:
                await self.averagers.drop()
            if self.averagers.averager is None and (state.dht_peers or self.dht_peers):
                await self.averagers.build(state.assignment.stage, stage.spec, stage.averaged_shapes(),
                                           list(state.dht_peers) or self.dht_peers)
