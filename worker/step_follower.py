"""The worker's side of the step protocol: report the gradient norm, sum with the replicas, apply, save.

The coordinator moves each step through OPEN, ACCUMULATED, AVERAGING and APPLYING
(coordinator/ledger/steps.py); for every RunState the follower does this member's part once per
(step, attempt): CONTRIBUTION (its own gradient's norm^2), AVERAGED (the replicas' sum, through
the averager, retried until it works or the coordinator moves the step on; each failed round is
reported with its cause), APPLIED (the optimizer step, then a checkpoint when it is the writer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable

import grpc
import torch

from gptjt_core.config import RunConfig
from gptjt_core.store_layout import is_shared_store
from gptjt_proto import coordinator_pb2 as cpb

from .averager_keeper import AveragerKeeper
from .averaging import RoundResult, sum_alone
from .compute import OTHER, ComputeQueue
from .faults import Faults
from .membership import CoordinatorClient
from .stage import LayerSlice
from .store_writer import write_stage_file

log = logging.getLogger("gptjt.worker")


class StepFollower:
    """This member's part of each step phase, once per (step, attempt)."""

    def __init__(self, run: RunConfig, worker_id: str, compute: ComputeQueue, coordinator: CoordinatorClient,
                 averagers: AveragerKeeper, faults: Faults, current: Callable[[], cpb.RunState | None],
                 rebuild_averager: Callable[[cpb.RunState, LayerSlice, bool], Awaitable[None]], on_crash: Callable[[asyncio.Task], None]):
        """current: the latest RunState (the averaging loop re-reads it); rebuild_averager(state,
        stage, fresh): (re)build the averager of `stage` if it is still the one held (the
        runner's, under its assignment lock); on_crash: a failed averaging task stops the worker."""
        self.run, self.worker_id, self.compute, self.coordinator = run, worker_id, compute, coordinator
        self.averagers, self.faults, self.current = averagers, faults, current
        self.rebuild_averager, self.on_crash = rebuild_averager, on_crash
        self.reported: set[tuple[int, int, int]] = set()  # (step, attempt, report kind)
        self._averaging: asyncio.Task | None = None
        self._isolated = False  # fault injection: isolate-averaging

    async def follow(self, stage: LayerSlice, state: cpb.RunState, idle: Callable[[], Awaitable[None]] | None,
                     finished: Callable[[], None]) -> None:
        """This member's part of the phase `state` names. idle: waits until no micro-batch of this
        worker is in flight (stage 0); finished: called once when the run is done."""
        step, attempt, a = state.step, state.attempt, state.assignment
        if state.phase == cpb.DONE:
            if (step, -1, cpb.APPLIED) not in self.reported:
                self.reported.add((step, -1, cpb.APPLIED))
                finished()
            return
        if not a.member:
            return  # a replica that joined mid-step takes part from the next step
        if state.phase == cpb.OPEN:
            await self.compute.run(OTHER, lambda: stage.admit(step, attempt) if stage.last_applied < step else None)
        elif state.phase == cpb.ACCUMULATED and (step, attempt, cpb.CONTRIBUTION) not in self.reported:
            if idle is not None:
                await idle()
            self._inject_gradient_faults(stage, step)
            scale = state.loss_scale

            def contribution() -> tuple[float, int, list]:
                stage.unscale_gradients(scale)  # the norm, the sum with replicas and the update are unscaled
                return stage.grad_norm_sq(), stage.step_micro_batches, sorted(stage.commitments.items())

            norm_sq, mbs, kept = await self.compute.run(OTHER, contribution)
            if await self.coordinator.report(self.worker_id, step, attempt, cpb.CONTRIBUTION, norm_sq,
                                             micro_batches=mbs, commitments=[c.to_pb(k) for k, c in kept]):
                self.reported.add((step, attempt, cpb.CONTRIBUTION))
        elif state.phase == cpb.AVERAGING and (step, attempt, cpb.AVERAGED) not in self.reported:
            if self._averaging is None or self._averaging.done():
                self._averaging = asyncio.create_task(self._average(stage, step, attempt))
                self._averaging.add_done_callback(self.on_crash)  # a crash stops the worker loudly
        elif state.phase == cpb.APPLYING and (step, attempt, cpb.APPLIED) not in self.reported:
            await self._apply(stage, state)

    async def _apply(self, stage: LayerSlice, state: cpb.RunState) -> None:
        step, attempt, a = state.step, state.attempt, state.assignment
        if stage.last_applied < step:
            if stage.local_steps:
                contribute = not a.contributors or self.worker_id in a.contributors
                total = self.run.train.micro_batches_per_step
                ok = await self.compute.run(OTHER, lambda: stage.apply_local(step, state.global_grad_norm, contribute,
                                                                             total))
            else:
                ok = await self.compute.run(OTHER, lambda: stage.apply_step(step, state.global_grad_norm))
            if not ok:
                log.warning("step %d: global gradient norm %s is not finite; update skipped", step,
                            state.global_grad_norm)
            every = self.run.train.checkpoint_every
            # every `every` steps, and after the run's last step, so that a run whose length is no
            # multiple of it still ends with its final weights in the store (train-local does too)
            due = every and ((step + 1) % every == 0 or step + 1 == self.run.train.steps)
            if due and a.checkpoint_writer:
                # Before reporting: the step closes only once every stage is in the store.
                try:
                    await self.save_checkpoint(stage, step + 1)
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.PERMISSION_DENIED:
                        raise
                    # A re-plan moved the stage's layers or its writer while we saved (the chaos soak
                    # saw the worker exit 1 on this): the new plan restores from what the store has.
                    log.warning("step %d: the store refused this stage's checkpoint (%s); the plan has moved on",
                                step, e.details())
        digest = await self.compute.run(OTHER, stage.state_digest)
        if await self.coordinator.report(self.worker_id, step, attempt, cpb.APPLIED, state_digest=digest):
            self.reported.add((step, attempt, cpb.APPLIED))

    async def save_checkpoint(self, stage: LayerSlice, position: int) -> None:
        """Send this stage's state (after `position` steps) to the coordinator's store."""
        blob = await self.compute.run(OTHER, stage.checkpoint_blob)
        progress = self._die_halfway(len(blob)) if self.faults.fires("die-checkpoint", position) else None
        if progress is not None:
            log.warning("fault injection: SIGKILL halfway through uploading the checkpoint of step %d", position)
        root = self.run.coordinator.checkpoint_store
        try:
            if is_shared_store(root):  # straight into the shared store; the coordinator gets the header
                where, sha256 = await asyncio.to_thread(write_stage_file, root, position, stage.spec, blob,
                                                        self.run.pipeline.chunk_bytes, progress)
                path = await self.coordinator.record_checkpoint(self.worker_id, position, stage.spec, where,
                                                                len(blob), sha256)
            else:
                path = await self.coordinator.put_checkpoint(self.worker_id, position, stage.spec, blob,
                                                             self.run.pipeline.chunk_bytes, progress)
        except BaseException:
            if progress is not None:  # refused before half of it was sent: nobody died
                self.faults.give_back("die-checkpoint", position)
            raise
        log.info("checkpointed stage %s at step %d (%.1f MB) -> %s", stage.spec, position, len(blob) / 1e6, path)

    @staticmethod
    def _die_halfway(nbytes: int) -> Callable[[int], None]:
        """An upload progress callback that SIGKILLs this process once half of `nbytes` is sent."""
        def progress(sent: int) -> None:
            if sent >= nbytes // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return progress

    def _inject_gradient_faults(self, stage: LayerSlice, step: int) -> None:
        """GPTJT_FAULTS poison@N / nan@N / inf@N (tests and drills only; see worker/faults.py).
        inf stands for an fp16 overflow: the gradient of one parameter becomes inf."""
        if self.faults.fires("inf", step):
            log.warning("fault injection: an overflow (inf) in this replica's gradient at step %d", step)
            stage.gradients()[0].view(-1)[0] = float("inf")
            self.faults.spend("inf")
        for kind, value in (("poison", 1e6), ("nan", float("nan"))):
            if self.faults.fires(kind, step):
                log.warning("fault injection: %s in this replica's gradient at step %d", kind, step)
                for g in stage.gradients():
                    g.mul_(value)

    # -- the averaging round -----------------------------------------------------------
    async def _average(self, stage: LayerSlice, step: int, attempt: int) -> None:
        """Sum the stage's gradients with its replicas, retrying with whoever is still alive
        until it works or the coordinator moves the step on (it restarts a stuck step)."""
        while True:
            state = self.current()
            if state is None or (state.phase, state.step, state.attempt) != (cpb.AVERAGING, step, attempt):
                return
            a = state.assignment
            members = list(a.peer_ids)
            # the members' averager peer ids, once the coordinator knows every one of them
            peers = list(a.peer_dht_ids) if len(a.peer_dht_ids) >= len(members) else None
            contribute = self.worker_id in a.contributors
            if not contribute and not stage.local_steps:
                log.warning("step %d: the coordinator refused this replica's gradient; receiving the others' sum",
                            step)
            if len(members) > 1 and (self.averagers.averager is None or self.averagers.averager.retired):
                if self.averagers.averager is not None:
                    log.warning("step %d: rebuilding the averager: %s", step, self.averagers.averager.retired)
                await self.rebuild_averager(state, stage, self.averagers.averager is not None)
                if self.averagers.averager is None:
                    await self._round_failed(state, stage, step, attempt, "this replica has no averager: "
                                             + (self.averagers.error or "the coordinator named no DHT peers"))
                    await asyncio.sleep(1.0)
                    continue
            tag = self._tag(step, attempt)
            result, norm_sq = await self.compute.run(OTHER, lambda: self._round(stage, step, attempt, members,
                                                                                peers, contribute, tag))
            if result.summed and stage.attempt == (step, attempt):
                self._summed(stage, step, result)
                if await self.coordinator.report(self.worker_id, step, attempt, cpb.AVERAGED, norm_sq,
                                                 group_weight=result.weight):
                    self.reported.add((step, attempt, cpb.AVERAGED))
                self.averagers.round_succeeded()
                return
            await self._round_failed(state, stage, step, attempt, result.detail, result.group_size > 0)
            await asyncio.sleep(0.2)

    def _tag(self, step: int, attempt: int) -> tuple:
        """What the group must agree on (e.g. (step, attempt)); faults may make it a liar's."""
        if self.faults.fires("isolate-averaging", step):
            log.warning("fault injection: from step %d on, this replica's averaging rounds carry a tag no other "
                        "replica uses", step)
            self._isolated = True
        if self.faults.fires("die-averaging", step):
            delay = self.run.averaging.matchmaking_s / 2  # while the group is being formed
            log.warning("fault injection: SIGKILL in %.1f s, inside the averaging round of step %d", delay, step)
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return (step, attempt, "isolated") if self._isolated else (step, attempt)

    def _round(self, stage: LayerSlice, step: int, attempt: int, members: list[str], peers: list[str] | None,
               contribute: bool, tag: tuple) -> tuple[RoundResult, float]:
        """One round, on the compute thread: (result, the summed gradient's norm^2)."""
        if stage.attempt != (step, attempt):  # the step moved on while this waited its turn
            return RoundResult(False, 0, 0.0), 0.0
        averager, expected = self.averagers.averager, len(members)
        wanted = lambda: self._round_wanted(step, attempt, members)  # noqa: E731
        if stage.local_steps:  # an outer step: the replicas' mean pseudo-gradient, applied in APPLYING
            deltas = stage.outer_contribution(step)
            # The pseudo-gradient sums inner steps already accepted; this step's verdict on the
            # replica's new gradient does not apply to it, only its own finiteness does.
            finite = all(bool(torch.isfinite(d).all()) for d in deltas)
            if not finite:
                log.error("step %d: this replica's pseudo-gradient is not finite; it receives the others' mean "
                          "without contributing", step)
            if expected > 1:
                res = averager.sum_gradients(deltas, 1, 1, expected, finite, tag=tag, worker_id=self.worker_id,
                                             members=members, member_peers=peers, wanted=wanted)
            else:
                res = sum_alone(deltas, 1 if finite else 0, 1)
            if not res.summed or stage.attempt != (step, attempt):
                return RoundResult(False, res.group_size, 0.0, res.detail), 0.0
            stage.set_outer_mean(step, deltas)
            return res, float(sum(torch.linalg.vector_norm(d) ** 2 for d in deltas))
        grads, mbs, total = stage.gradients(), stage.step_micro_batches, self.run.train.micro_batches_per_step
        if expected > 1:
            res = averager.sum_gradients(grads, mbs, total, expected, contribute, tag=tag, worker_id=self.worker_id,
                                         members=members, member_peers=peers, wanted=wanted)
        else:
            res = sum_alone(grads, mbs if contribute else 0, total)
        return res, (stage.grad_norm_sq() if res.summed else 0.0)

    def _round_wanted(self, step: int, attempt: int, members: list[str]) -> bool:
        """Is a round of these members still what the step needs? (Asked from the compute thread
        while the round waits for its group: a group is exactly the members, so one the
        coordinator dropped, e.g. dead, would hold the others until the round's timeout.)"""
        state = self.current()
        return (state is not None and (state.phase, state.step, state.attempt) == (cpb.AVERAGING, step, attempt)
                and set(state.assignment.peer_ids) == set(members))

    def _summed(self, stage: LayerSlice, step: int, result: RoundResult) -> None:
        if stage.local_steps:
            log.info("step %d: outer step: averaged the pseudo-gradients of %d replica(s)", step, result.group_size)
        else:
            log.info("step %d: summed gradients of %d replica(s), %g of %d micro-batches", step, result.group_size,
                     result.weight, self.run.train.micro_batches_per_step)

    async def _round_failed(self, state: cpb.RunState, stage: LayerSlice, step: int, attempt: int,
                            detail: str, group_formed: bool = False) -> None:
        """Tell the coordinator why (its stall diagnosis names the cause); after
        averaging.rebuild_after_failures failures in a row with no group, rebuild the averager
        from the DHT peers the coordinator names now: a peer cut off from the others finds them again."""
        if not detail:
            return  # the step moved on while the round waited its turn: nothing failed
        await self.coordinator.report(self.worker_id, step, attempt, cpb.AVERAGING_FAILED, detail=detail)
        if self.averagers.round_failed(group_formed) and self.averagers.averager is not None:
            log.warning("averaging failed %d times in a row (last: %s); rebuilding the averager from %d DHT peer(s)",
                        self.averagers.failed_rounds, detail, len(state.dht_peers))
            await self.rebuild_averager(state, stage, True)

    async def stop(self) -> None:
        if self._averaging is not None:
            self._averaging.cancel()
            await asyncio.gather(self._averaging, return_exceptions=True)
