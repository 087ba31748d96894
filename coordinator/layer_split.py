"""Layer ranges for replica groups in pipeline order: contiguous, each within its group's
smallest memory, minimising the slowest stage's compute (dynamic programming). Pure; the
placement search (placement.py) calls it for every candidate it scores."""

from __future__ import annotations

import functools

from .cost_model import MEMORY_HEADROOM as HEADROOM
from .cost_model import Device, ModelShape, StagePlacement, Workload, memory_needed_gb


@functools.lru_cache(maxsize=64)
def _memory_table(model: ModelShape, work: Workload) -> list[list[float]]:
    """GB one replica of the stage holding layers [start, end) needs, as table[start][end]:
    the split below reads it ~10^4 times an evaluation, faster from a list than from the cache
    of memory_needed_gb (whose key hashes the model and the workload at every call)."""
    n = model.n_layer
    return [[memory_needed_gb(model, work, a, b) if a < b else 0.0 for b in range(n + 1)] for a in range(n + 1)]


def split_layers(groups: list[tuple[int, ...]], devices: list[Device], model: ModelShape,
                 work: Workload) -> list[StagePlacement] | None:
    """Contiguous layer ranges for groups in pipeline order, minimising the slowest stage's
    compute (memory-feasible), or None when no split fits."""
    rate = tuple(sum(devices[w].tflops for w in g) for g in groups)
    memory = tuple(min(devices[w].memory_gb for w in g) * HEADROOM for g in groups)
    # the head in block parameters' worth at the last group's block rate (cost_model.stage_compute_s)
    head_weight = rate[-1] / sum(devices[w].head_rate for w in groups[-1]) if groups else 1.0
    bounds = _split_bounds(model, work, rate, memory, head_weight)
    return None if bounds is None else [StagePlacement(a, b, g) for (a, b), g in zip(bounds, groups)]


# A search scores many candidates whose groups sum to the same rates and memories (a swap of
# two like cards, a 2-opt and its undo, one plan re-scored from several starts): the split
# depends on nothing else.
@functools.lru_cache(maxsize=65536)
def _split_bounds(model: ModelShape, work: Workload, rate: tuple[float, ...],
                  memory: tuple[float, ...], head_weight: float = 1.0) -> tuple[tuple[int, int], ...] | None:
    """split_layers' dynamic programme on the groups' summed rates (TFLOP/s) and smallest memory
    (GB a plan may use): (start, end) per group, or None. head_weight: the last group's block
    rate over its head rate (the head's parameters cost that many blocks' parameters each)."""
    n, s = model.n_layer, len(rate)
    need = _memory_table(model, work)
    inf = float("inf")
    lp, hp = model.layer_params, model.head_params * head_weight
    # best[i][l]: the least "slowest stage" covering layers [0, l) with stages 0..i-1. The search
    # runs this ~10^3 times a plan, so the inner loop is kept to plain locals (a search at 64
    # workers spent 60 % of its time here).
    best = [[inf] * (n + 1) for _ in range(s + 1)]
    cut = [[0] * (n + 1) for _ in range(s + 1)]
    best[0][0] = 0.0
    for i in range(1, s + 1):
        prev, row, cuts, fits, r = best[i - 1], best[i], cut[i], memory[i - 1], rate[i - 1]
        # the last stage ends at the last layer: of its row only that end is read
        for end in (range(i, n - (s - i) + 1) if i < s else (n,)):
            tail = hp if end == n else 0
            least, at = inf, 0
            # the stage's memory and its own time grow as its start moves left: walk left from the
            # shortest stage and stop at the first that does not fit (most starts, on cards a stage
            # fills) or whose own time alone exceeds the best so far (no start further left can
            # beat it); '<=' keeps the leftmost of equal splits
            for start in range(end - 1, i - 2, -1):
                if need[start][end] > fits:
                    break
                t = ((end - start) * lp + tail) / r
                if t > least:
                    break
                before = prev[start]
                if before > t:
                    t = before
                if t <= least:
                    least, at = t, start
            row[end], cuts[end] = least, at
    if best[s][n] == inf:
        return None
    bounds, end = [], n
    for i in range(s, 0, -1):
        bounds.append((cut[i][end], end))
        end = cut[i][end]
    bounds.reverse()
    return tuple(bounds)
