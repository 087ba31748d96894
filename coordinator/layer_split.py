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
    bounds = _split_bounds(model, work, rate, memory)
    return None if bounds is None else [StagePlacement(a, b, g) for (a, b), g in zip(bounds, groups)]


# A search scores many candidates whose groups sum to the same rates and memories (a swap of
# two like cards, a 2-opt and its undo, one plan re-scored from several starts): the split
# depends on nothing else.
@functools.lru_cache(maxsize=65536)
def _split_bounds(model: ModelShape, work: Workload, rate: tuple[float, ...],
                  memory: tuple[float, ...]) -> tuple[tuple[int, int], ...] | None:
    """split_layers' dynamic programme on the groups' summed rates (TFLOP/s) and smallest memory
    (GB a plan may use): (start, end) per group, or None."""
    n, s = model.n_layer, len(rate)
    need = _memory_table(model, work)
    # Row i of the programme depends only on the first i groups (and the stage count, which bounds
    # its ends). Most candidates a search scores differ from the last one from some group on (a
    # swap, a 2-opt, a resize), so the rows before it are looked up, not computed again. In bench
    # churn's quick form ~9 in 10 splits miss the cache above, a quarter of their rows are found
    # here, and the programme is ~14 % of the churned hour's time.
    prefixes = _PREFIX_ROWS.setdefault((model, work), {})
    if len(_PREFIX_ROWS) > _MODELS_KEPT:
        _PREFIX_ROWS.clear()
        prefixes = _PREFIX_ROWS[(model, work)] = {}
    best = [_INF] * (n + 1)
    best[0] = 0.0
    rows = []
    for i in range(1, s):
        key = (s, rate[:i], memory[:i])
        row = prefixes.get(key)
        if row is None:
            if len(prefixes) >= _PREFIXES_KEPT:
                prefixes.clear()  # a search's candidates share prefixes with its recent ones, not old ones
            row = prefixes[key] = _stage_row(best, need, model, rate[i - 1], memory[i - 1], i, i, n - (s - i))
        rows.append(row)
        best = row[0]
    # the last stage ends at the last layer: only that end is needed of its row
    last, cut = _stage_row(best, need, model, rate[-1], memory[-1], s, n, n)
    if last[n] == _INF:
        return None
    bounds, end = [(cut[n], n)], cut[n]
    for _, cuts in reversed(rows):
        bounds.append((cuts[end], end))
        end = cuts[end]
    bounds.reverse()
    return tuple(bounds)


_INF = float("inf")
_PREFIX_ROWS: dict[tuple[ModelShape, Workload], dict[tuple, tuple[list[float], list[int]]]] = {}
_MODELS_KEPT, _PREFIXES_KEPT = 4, 8192  # ~1 KB a row: ~8 MB at most for one model


def _stage_row(prev: list[float], need: list[list[float]], model: ModelShape, rate: float, fits: float,
               stage: int, first_end: int, last_end: int) -> tuple[list[float], list[int]]:
    """One row of the programme, for a stage of `rate` TFLOP/s that may use `fits` GB after the
    stages of `prev`: (best, cut), best[end] the least "slowest stage" covering layers [0, end)
    with this stage last (inf where none fits), cut[end] where this stage then starts; for ends
    first_end..last_end. `stage` counts from 1: stage i of s starts at layer i - 1 or later and
    ends between i and n - (s - i)."""
    n, lp, hp = model.n_layer, model.layer_params, model.head_params
    row, cuts = [_INF] * (n + 1), [0] * (n + 1)
    # The search runs this ~10^3 times a plan, so the inner loop is kept to plain locals (a search
    # at 64 workers spent 60 % of its time here).
    for end in range(first_end, last_end + 1):
        tail = hp if end == n else 0
        least, at = _INF, 0
        # the stage's memory and its own time grow as its start moves left: walk left from the
        # shortest stage and stop at the first that does not fit (most starts, on cards a stage
        # fills) or whose own time alone exceeds the best so far (no start further left can
        # beat it); '<=' keeps the leftmost of equal splits
        for start in range(end - 1, stage - 2, -1):
            if need[start][end] > fits:
                break
            t = ((end - start) * lp + tail) / rate
            if t > least:
                break
            before = prev[start]
            if before > t:
                t = before
            if t <= least:
                least, at = t, start
        row[end], cuts[end] = least, at
    return row, cuts
