"""Forward + backward seconds of each stage of a layer split, measured alone in this process, and
the step a perfect pipeline of those stages would take: the yardstick a swarm's measured step is
held against (bench swarm, bench link).

A stage here is what a worker runs (gptjt_core.model.load_stage: the first stage holds the
embedding, the last the LM head and the loss), on random token ids of one micro-batch
(micro_batch x seq_len), with `threads` torch threads."""

from __future__ import annotations

import statistics
import time

import torch


def stage_seconds(source: str, ranges: list[tuple[int, int]], micro_batch: int, seq_len: int,
                  threads: int = 1, repeats: int = 5) -> list[float]:
    """Median forward + backward seconds of one micro-batch through each stage of `ranges`
    ([start_layer, end_layer) per stage, in order) over `repeats` runs after a warm-up."""
    from gptjt_core.model import StageSpec, load_stage, model_config_for
    from gptjt_core.ul2 import batch_loss

    if not ranges or ranges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(f"stage ranges {ranges} do not cover the model's layers from 0 in order: "
                         "pass [start, end) per stage, each starting where the one before ends")
    config = model_config_for(source, "eager")
    last = len(ranges) - 1
    stages = [load_stage(source, StageSpec(a, b, embed=i == 0, head=i == last)) for i, (a, b) in enumerate(ranges)]
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    prefix = torch.zeros(micro_batch, dtype=torch.long)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: list[list[float]] = [[] for _ in stages]
    try:
        for _ in range(repeats + 1):
            x = ids
            for i, stage in enumerate(stages):
                t0 = time.perf_counter()
                if i > 0:
                    x = x.detach().requires_grad_()
                out = stage(x, prefix)
                if i == last:
                    batch_loss(out, ids, micro_batch).backward()
                else:
                    out.backward(torch.randn_like(out))
                times[i].append(time.perf_counter() - t0)
                x = out
    finally:
        torch.set_num_threads(before)
    return [statistics.median(t[1:]) for t in times]


def ideal_pipeline_step_s(stage_s: list[float], micro_batches: int) -> float:
    """A synchronous step of `micro_batches` through stages taking `stage_s` each (forward and
    backward together), with free links and no protocol: the first micro-batch crosses every
    stage, the other micro_batches - 1 follow at the slowest stage's pace (GPipe's bound; the
    scheduler's cost_model.predict_step has the same pipeline term, with links, on predicted
    stage times: this one is for measured times and no links)."""
    return sum(stage_s) + (micro_batches - 1) * max(stage_s)
