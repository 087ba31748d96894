"""Summing a stage's gradients across its data-parallel replicas with hivemind.

Not yet wired into the step protocol (see the closing note of issue 4); this is the
building block. Why a weighted average: the loss is normalised by the GLOBAL batch, so
the stage's full-batch gradient is the SUM of its replicas' accumulated gradients. Each
replica contributes g_r / w_r with weight w_r (w_r = micro-batches it processed), so
hivemind's weighted mean is sum(g_r) / sum(w_r); times the step's micro-batch count M
this is exactly sum(g_r) when every replica took part. When a replica vanishes mid-round,
the survivors finish within the timeout and the same formula rescales their partial sum
to the full batch: the lost share is replaced by the survivors' mean per micro-batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "fp16", "8bit-blockwise")


def hivemind_compression(name: str):
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression

    if name not in COMPRESSIONS:
        raise ValueError(f"averaging compression {name!r} is unknown; use one of {COMPRESSIONS}")
    return {"none": NoCompression, "fp16": Float16Compression, "8bit-blockwise": BlockwiseQuantization}[name]()


@dataclass
class RoundResult:
    """What one averaging round produced."""

    summed: bool  # False: the round failed (no group, timeout) and the gradients are unchanged
    group_size: int  # replicas whose contributions are in the result (this one included)
    weight: float  # micro-batches those replicas processed


class StageAverager:
    """One hivemind DecentralizedAverager per (run, stage); construct it in the main thread."""

    def __init__(self, dht, run_name: str, stage: int, shapes: list[torch.Size], expected_group: int,
                 compression: str = "none", min_matchmaking_time: float = 1.0, timeout: float = 10.0):
        from hivemind.averaging import DecentralizedAverager

        self.timeout = timeout
        self.buffers = [torch.zeros(s) for s in shapes]
        self.averager = DecentralizedAverager(
            self.buffers, dht, prefix=f"gptjt_{run_name}_stage{stage}", target_group_size=expected_group,
            min_group_size=min(2, expected_group), min_matchmaking_time=min_matchmaking_time, request_timeout=1.0,
            compression=hivemind_compression(compression), start=True)

    def sum_gradients(self, grads: list[torch.Tensor], micro_batches: int, total_micro_batches: int) -> RoundResult:
        """Replace `grads` (in place) by the stage's full-batch gradient across replicas.

        A replica with non-finite gradients does not take part (its poison never reaches the
        others) and keeps its gradients unchanged; the caller reports it.
        """
        if micro_batches <= 0:
            raise ValueError(f"a replica that processed {micro_batches} micro-batches has nothing to average")
        if not all(torch.isfinite(g).all() for g in grads):
            log.warning("refusing to average non-finite gradients")
            return RoundResult(False, 0, 0.0)
        with self.averager.get_tensors() as buffers:
            for buf, g in zip(buffers, grads):
                buf.copy_(g.detach().float() / micro_batches)
        try:
            # gather: every member learns how many micro-batches the others processed
            group = self.averager.step(gather=micro_batches, weight=float(micro_batches), timeout=self.timeout)
        except Exception as e:  # hivemind raises on a failed round; the step must not stall
            log.warning("averaging round failed (%s); keeping this replica's own gradients", e)
            group = None
        if group is None:
            return RoundResult(False, 0, 0.0)
        with self.averager.get_tensors() as buffers:
            for buf, g in zip(buffers, grads):
                g.copy_((buf * total_micro_batches).to(g.dtype))
        return RoundResult(True, len(group), float(sum(group.values())))

    def shutdown(self) -> None:
        self.averager.shutdown()
