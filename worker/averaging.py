"""Summing a stage's gradients across its data-parallel replicas with hivemind.

The loss is normalised by the GLOBAL batch, so the stage's full-batch gradient is the SUM of
its replicas' accumulated gradients. Each contributing replica enters its own sum g_r with
weight 1 (a refused, poisoned replica enters zeros with weight 0, so it still receives the
result and stays identical to the others); hivemind's weighted mean times the number of
contributors is then sum(g_r). Every member also gathers how many micro-batches each
contributor holds (W in total). When W is short of the step's M micro-batches (a replica
died and took its share along), the sum is scaled by M / W: the lost share is estimated by
the survivors' mean gradient per micro-batch.

With compression "none" the buffers are float64: sums of float32 gradients are then exact,
hivemind's "own + (mean - own)" delta arithmetic returns the same mean to every member, and
casting back to float32 gives every replica bit-identical gradients. Lossy compressions
round each member's delta differently, so replicas then differ by the compression error.
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


def sum_alone(grads: list[torch.Tensor], micro_batches: int, total_micro_batches: int) -> RoundResult:
    """The only replica of its stage: no round, only the M / W scaling of its own share."""
    if micro_batches <= 0:
        return RoundResult(False, 1, 0.0)
    if micro_batches != total_micro_batches:
        for g in grads:
            g.mul_(total_micro_batches / micro_batches)
    return RoundResult(True, 1, float(micro_batches))


class StageAverager:
    """One hivemind DecentralizedAverager per (run, stage); construct it in the main thread.

    max_group: the most replicas a stage can have; a round starts after min_matchmaking_time
    with at least two of them, so the survivors of a lost replica still average.
    """

    def __init__(self, dht, run_name: str, stage: int, shapes: list[torch.Size], max_group: int,
                 compression: str = "none", min_matchmaking_time: float = 1.0, timeout: float = 10.0):
        from hivemind.averaging import DecentralizedAverager

        self.timeout = timeout
        dtype = torch.float64 if compression == "none" else torch.float32
        self.buffers = [torch.zeros(s, dtype=dtype) for s in shapes]
        self.averager = DecentralizedAverager(
            self.buffers, dht, prefix=f"gptjt_{run_name}_stage{stage}", target_group_size=max_group,
            min_group_size=min(2, max_group), min_matchmaking_time=min_matchmaking_time, request_timeout=1.0,
            compression=hivemind_compression(compression), start=True)

    def sum_gradients(self, grads: list[torch.Tensor], micro_batches: int, total_micro_batches: int,
                      expected_group: int, contribute: bool = True, tag: tuple = ()) -> RoundResult:
        """Replace `grads` (in place) by the stage's full-batch gradient across replicas.

        expected_group: replicas taking part (1: no round, only the M / W scaling).
        contribute: False for a refused replica: it sends zeros with weight 0 and receives the sum.
        tag: e.g. (step, attempt); a group whose members disagree on it is a failed round.
        On failure (no group, timeout, mismatched tags) `grads` are left unchanged.
        """
        if contribute and not all(torch.isfinite(g).all() for g in grads):
            raise ValueError("non-finite gradients must not be averaged; pass contribute=False")
        mine = micro_batches if contribute else 0
        if expected_group <= 1:
            return sum_alone(grads, mine, total_micro_batches)
        with self.averager.get_tensors() as buffers:
            for buf, g in zip(buffers, grads):
                if contribute:
                    buf.copy_(g.detach())
                else:
                    buf.zero_()
        try:
            group = self.averager.step(gather={"tag": list(tag), "micro_batches": mine},
                                       weight=1.0 if contribute else 0.0, timeout=self.timeout)
        except Exception as e:  # hivemind raises on a failed round; the step must not stall
            log.warning("averaging round failed (%s: %s)", type(e).__name__, e)
            group = None
        if group is None:
            return RoundResult(False, 0, 0.0)
        infos = list(group.values())
        if any(info.get("tag") != list(tag) for info in infos):
            log.warning("averaging group mixed step attempts %s; discarding the round",
                        sorted({tuple(i.get("tag", ())) for i in infos}))
            return RoundResult(False, len(infos), 0.0)
        contributors = sum(1 for i in infos if i["micro_batches"] > 0)
        weight = float(sum(i["micro_batches"] for i in infos))
        if weight <= 0:
            return RoundResult(False, len(infos), 0.0)
        scale = contributors * total_micro_batches / weight  # mean -> sum -> full batch
        with self.averager.get_tensors() as buffers:
            for buf, g in zip(buffers, grads):
                g.copy_((buf * scale).to(g.dtype))
        return RoundResult(True, len(infos), weight)

    def shutdown(self) -> None:
        self.averager.shutdown()
