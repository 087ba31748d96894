"""Spot checks: recompute another replica's micro-batch with the same weights and tell the coordinator what came out.

The coordinator hands a verifier checks with its heartbeat replies (HeartbeatReply.checks): a
micro-batch of step S that another member of the same stage committed to. The verifier fetches
that member's evidence (Stage.FetchEvidence: the bytes it received), checks them against its
commitment, recomputes forward and backward with the weights of step S and sends its own
commitment back (ReportCheck). It never judges: the coordinator compares the two commitments
with the calibrated tolerance and keeps the verdict (coordinator/ledger/spot_checks.py).

Replicas of a stage hold the same weights during a step (sync averaging: each applies the same
averaged gradient), so the verifier's own weights are the checked worker's: its current ones
while step S is still open for it, or the copy it kept before applying S (LayerSlice.weights_for).
Checks run as OTHER jobs on the compute queue, after every micro-batch waiting: off the hot path.

A standby checks a stage that has no other replica the same way, with that stage's weights of
step S loaded from the checkpoint store (worker/check_weights.py; SpotCheck.weights says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import torch
from torch.func import functional_call

from gptjt_core.commitment import Commitment, input_digest
from gptjt_core.sketching import sketch_tensor
from gptjt_core.ul2 import batch_loss
from gptjt_proto import coordinator_pb2 as cpb

from .check_weights import CheckWeights
from .compute import OTHER, ComputeQueue
from .evidence import EvidenceError, StageInputs, check_fits, read_evidence
from .stage import LayerSlice

log = logging.getLogger(__name__)

class WeightsGone(RuntimeError):
    """This replica no longer holds the weights the checked micro-batch used."""


def recompute(stage: LayerSlice, step: int, wire: tuple[bytes, ...], inputs: StageInputs, claimed: Commitment,
              global_batch: int, loss_scale: float = 1.0) -> Commitment:
    """Our commitment to the micro-batch `inputs` of `step` (call on the compute thread).

    Sketches take the claimed sketches' keys and sizes: an honest recomputation then differs
    from the claim only by float noise. Gradients are taken with torch.autograd.grad, so the
    step's accumulated parameter gradients are not touched. loss_scale: the checked attempt's,
    from the coordinator (the last stage sent its gradient scaled by it)."""
    weights = stage.weights_for(step)
    if weights is None:
        raise WeightsGone(f"this replica holds step {stage.position}, not the weights of step {step} "
                          "(it keeps the step before its last update only)")
    device, spec = stage.device, stage.spec
    x = inputs.inputs.to(device)
    if not spec.embed:
        x = x.to(torch.float32).requires_grad_()
    prefix = inputs.prefix_lengths.to(device)
    # No activation checkpointing here: its recomputation would run in the backward, after
    # functional_call has put the module's own (perhaps newer) parameters back.
    segment, stage.model.checkpoint_segment = stage.model.checkpoint_segment, 0
    try:
        with torch.enable_grad(), stage.precision.autocast():
            out = functional_call(stage.model, weights, (x, prefix))
    finally:
        stage.model.checkpoint_segment = segment
    if spec.head:
        loss = batch_loss(out, inputs.labels.to(device), global_batch)
        output = torch.tensor([float(loss.detach())])
        grad = torch.autograd.grad(loss * loss_scale, x)[0] if not spec.embed else None
    else:
        output = out.detach()
        grad = None
        if not spec.embed:
            grad = torch.autograd.grad(out, x, grad_outputs=inputs.returned.to(device=device, dtype=out.dtype))[0]
    out_sketch = sketch_tensor(output, key=claimed.output.key, k=claimed.output.k)
    grad_sketch = None
    if grad is not None and claimed.grad is not None:
        grad_sketch = sketch_tensor(grad, key=claimed.grad.key, k=claimed.grad.k)
    return Commitment(input_digest(*wire), out_sketch, grad_sketch)


class SpotChecker:
    """The verifier's side: takes checks from heartbeat replies and answers each one. A RunState
    that announces a check not yet taken (`wants`) makes the runner send a heartbeat at once."""

    def __init__(self, worker_id: str, compute: ComputeQueue, fetch_evidence, report_check,
                 stage: Callable[[], tuple[int, LayerSlice | None]], global_batch: int,
                 stored: CheckWeights | None = None):
        """fetch_evidence(check) -> EvidenceReply (from the checked worker's stage server);
        report_check(worker_id, check_id, commitment_bytes, unable) -> verdict (CoordinatorClient);
        stage() -> (the stage index this worker is assigned, the loaded LayerSlice or None);
        stored: loads the weights of a check that names the store or the model source."""
        self.worker_id, self.compute, self.stored = worker_id, compute, stored
        self.fetch_evidence, self.report_check = fetch_evidence, report_check
        self.stage, self.global_batch = stage, global_batch
        self.queue: asyncio.Queue[cpb.SpotCheck] = asyncio.Queue()
        self.seen: set[int] = set()  # check ids taken (a reply may repeat one still pending)
        self.asked_for = 0  # the newest check id asked for by a heartbeat, or taken from a reply
        self.done = 0

    def wants(self, newest_check: int) -> bool:
        """Whether a RunState announcing check `newest_check` (its id; 0: none waiting) calls for a
        heartbeat now, which hands the check over: once per announced id, and never for one
        already taken (a heartbeat reply that held it, or a newer one, came first)."""
        if newest_check <= self.asked_for:
            return False
        self.asked_for = newest_check
        return True

    def take(self, checks) -> None:
        for check in checks:
            if check.check_id not in self.seen:
                self.seen.add(check.check_id)
                self.asked_for = max(self.asked_for, check.check_id)  # held: no need to ask for it
                self.queue.put_nowait(check)

    async def run(self) -> None:
        while True:
            check = await self.queue.get()
            await self._answer(check)

    async def _answer(self, check: cpb.SpotCheck) -> None:
        blob, unable = b"", ""
        try:
            blob = await self._recompute(check)
        except (EvidenceError, WeightsGone) as e:
            unable = str(e)
        except grpc.aio.AioRpcError as e:
            unable = f"evidence unavailable from {check.worker_id} ({e.code().name}: {e.details()})"
        except Exception as e:  # evidence comes from a stranger: no failure of it may stop this loop
            unable = f"recomputation failed: {type(e).__name__}: {e}"
        try:
            verdict = await self.report_check(self.worker_id, check.check_id, blob, unable[:500])
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise  # our session ended: the runner joins again (worker/membership.py session_ended)
            log.warning("could not report spot check %d (%s); the coordinator lets it go stale", check.check_id,
                        e.code().name)
            return
        self.done += 1
        log.info("spot check %d (step %d, ticket %d of %s): %s%s", check.check_id, check.step, check.ticket_id,
                 check.worker_id, verdict, f" ({unable})" if unable else "")

    async def _fetch(self, check: cpb.SpotCheck, tries: int = 4, pause_s: float = 0.5):
        """The checked worker's evidence. A standby's check may reach us before the checked worker
        has heard (on its Watch stream) that we may fetch: PERMISSION_DENIED is tried again."""
        for attempt in range(tries):
            try:
                return await self.fetch_evidence(check)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.PERMISSION_DENIED or attempt == tries - 1:
                    raise
                await asyncio.sleep(pause_s)

    async def _stage_for(self, check: cpb.SpotCheck) -> LayerSlice:
        """The stage to recompute `check` with: ours, or one loaded with the weights it names."""
        if check.weights:
            if self.stored is None:
                raise WeightsGone(f"this worker loads no stage for checks (weights {check.weights!r})")
            try:
                return await self.stored.stage_for(check)
            except ValueError as e:
                raise WeightsGone(str(e)) from e
            except grpc.aio.AioRpcError as e:
                raise WeightsGone(f"the store's checkpoint of step {check.step} is unavailable ({e.code().name}: "
                                  f"{e.details()})") from e
        index, stage = self.stage()
        if stage is None or index != check.stage:
            # A re-plan moved us: another stage's weights would recompute garbage and accuse an honest worker.
            raise WeightsGone(f"this worker holds {'no stage' if stage is None else f'stage {index}'} now, not "
                              f"stage {check.stage}")
        return stage

    async def _recompute(self, check: cpb.SpotCheck) -> bytes:
        stage = await self._stage_for(check)
        claimed = Commitment.from_bytes(check.commitment)
        reply = await self._fetch(check)
        inputs = read_evidence(reply, claimed.input, check.returned or None, stage.spec.embed, stage.spec.head)
        train = stage.run.train
        check_fits(inputs, train.micro_batch, train.seq_len, stage.model.config.n_embd, stage.spec.embed)
        wire = tuple(bytes(p) for p in reply.wire)
        scale = check.loss_scale or 1.0
        ours = await self.compute.run(OTHER, lambda: recompute(stage, check.step, wire, inputs, claimed,
                                                               self.global_batch, scale))
        return ours.to_bytes()
