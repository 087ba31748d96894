"""The order of work for one micro-batch at one stage: forward, send it down, backward (no gRPC here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptjt_core.compression import Encoded, decode, encode
from gptjt_proto import stage_pb2 as spb

from .commitments import commit, sent_digest
from .compute import BACKWARD, FORWARD, OTHER, ComputeQueue
from .downstream import DownstreamSender
from .evidence import Evidence
from .lies import Liar, process_liar
from .stage import LayerSlice


@dataclass(frozen=True)
class StageInput:
    """One micro-batch as this stage takes it."""

    key: tuple[int, int]  # (ticket id, attempt): names the forward's saved graph
    step: int
    inputs: torch.Tensor  # (B, T) token ids at stage 0, else (B, T, D) activations
    prefix_lengths: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B, T); the last stage computes the loss on them
    global_batch: int  # sequences in the step: the loss is a share of the step's mean
    wire: tuple[bytes, ...]  # what the input digest hashes: commitments.tokens_parts / received_parts
    gradient_codec: str | None = None  # how the input gradient goes back upstream; None at stage 0
    loss_scale: float = 1.0  # the attempt's loss scale (RunState.loss_scale); the last stage scales its loss


@dataclass(frozen=True)
class StageOutcome:
    """What one stage's work on a micro-batch produced (loss, targets, the gradient to send back)."""
    loss: float  # this micro-batch's share of the step loss, from the last stage
    target_tokens: int
    input_grad: torch.Tensor | None  # d loss / d inputs, (B, T, D); None at stage 0 (token ids)
    sent_grad: Encoded | None = None  # input_grad in item.gradient_codec: the codes to send back


def keep_evidence(stage: LayerSlice, item: StageInput, returned: Encoded | None) -> None:
    """What a replica needs to recompute this micro-batch (worker/evidence.py), when the run spot-checks."""
    if stage.keep_evidence:
        shape = tuple(item.inputs.shape) if stage.spec.embed else ()
        stage.evidence[item.key] = Evidence(item.step, item.wire, shape, returned)


async def work_micro_batch(stage: LayerSlice, compute: ComputeQueue, downstream: DownstreamSender | None,
                           item: StageInput, next_header: Callable[[], spb.MicroBatchHeader],
                           liar: Liar | None = None) -> StageOutcome:
    """Run `item` through this stage in the order gptjt_core.schedule.micro_batch_plan gives
    (the caller has received it and sends the input gradient back): at the last stage forward
    and backward as one compute job (1F1B would run them back to back anyway); elsewhere
    forward, send the output down (`next_header()` is what travels with it), take the
    gradient that comes back, backward. The compute queue orders the jobs against other
    micro-batches'. If anything fails or is cancelled between the forward and the backward,
    the forward's saved graph is discarded before the error goes on.

    What the stage sends passes `liar` (default: the lies GPTJT_FAULTS arms in this process,
    tests and drills only; worker/lies.py): honest unless a lie-* kind is armed. The stage
    commits to what it sent, after the liar (a drill's liar commits honestly to its lie): once
    the backward is done, on the compute thread, into `stage.commitments` under the item's key
    (worker/commitments.py), before the gradient goes back."""
    key, step = item.key, item.step
    liar = process_liar() if liar is None else liar

    def send_back(grad: torch.Tensor | None) -> Encoded | None:
        return None if grad is None else encode(grad, item.gradient_codec)

    if stage.spec.head:
        def last() -> tuple[float, int, torch.Tensor | None, Encoded | None]:
            loss, targets, grad = stage.forward_backward(key, step, item.inputs, item.prefix_lengths, item.labels,
                                                         item.global_batch, item.loss_scale)
            loss, grad = liar.loss(key, step, loss), liar.gradient(key, step, grad)
            sent_grad = send_back(grad)
            stage.commitments[key] = commit(item.wire, torch.tensor([loss]), None, None, grad, sent_grad)
            keep_evidence(stage, item, None)
            return loss, targets, grad, sent_grad

        return StageOutcome(*await compute.run(FORWARD, last))
    try:
        out = await compute.run(FORWARD, lambda: liar.output(key, step, stage.forward(key, step, item.inputs,
                                                                                      item.prefix_lengths)))
        header = next_header()
        reply, grad_enc, activations = await downstream.send(header, out)

        def backward() -> tuple[torch.Tensor | None, Encoded | None]:
            grad = liar.gradient(key, step, stage.backward(key, step, decode(grad_enc)))
            sent_grad = send_back(grad)
            stage.commitments[key] = commit(item.wire, out, sent_digest(header, activations), grad_enc, grad,
                                            sent_grad)
            keep_evidence(stage, item, grad_enc)
            return grad, sent_grad

        grad_in, sent_grad = await compute.run(BACKWARD, backward)
    except BaseException:
        await compute.run(OTHER, lambda: stage.discard(key))
        raise
    return StageOutcome(reply.loss, reply.target_tokens, grad_in, sent_grad)
