"""The order of work for one micro-batch at one stage: forward, send it down, backward (no gRPC here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptjt_core.compression import decode
from gptjt_proto import stage_pb2 as spb

from .compute import BACKWARD, FORWARD, OTHER, ComputeQueue
from .downstream import DownstreamSender
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


@dataclass(frozen=True)
class StageOutcome:
    """What one stage's work on a micro-batch produced (loss, targets, the gradient to send back)."""
    loss: float  # this micro-batch's share of the step loss, from the last stage
    target_tokens: int
    input_grad: torch.Tensor | None  # d loss / d inputs, (B, T, D); None at stage 0 (token ids)


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
    tests and drills only; worker/lies.py): honest unless a lie-* kind is armed."""
    key, step = item.key, item.step
    liar = process_liar() if liar is None else liar
    if stage.spec.head:
        def last() -> tuple[float, int, torch.Tensor | None]:
            loss, targets, grad = stage.forward_backward(key, step, item.inputs, item.prefix_lengths, item.labels,
                                                         item.global_batch)
            return liar.loss(key, step, loss), targets, liar.gradient(key, step, grad)

        return StageOutcome(*await compute.run(FORWARD, last))
    try:
        out = await compute.run(FORWARD, lambda: liar.output(key, step, stage.forward(key, step, item.inputs,
                                                                                      item.prefix_lengths)))
        reply, grad_enc = await downstream.send(next_header(), out)
        grad_in = await compute.run(BACKWARD, lambda: liar.gradient(key, step, stage.backward(key, step,
                                                                                             decode(grad_enc))))
    except BaseException:
        await compute.run(OTHER, lambda: stage.discard(key))
        raise
    return StageOutcome(reply.loss, reply.target_tokens, grad_in)
