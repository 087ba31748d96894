"""coordinator/layer_split.py: split_layers' dynamic programme against every contiguous split, on
random groups whose memory binds (the programme stops walking a stage's start left at the first
that does not fit)."""

from __future__ import annotations

import itertools
import random

import pytest

from coordinator.cost_model import Device, ModelShape, Workload, memory_needed_gb
from coordinator import layer_split
from coordinator.layer_split import HEADROOM, split_layers

MODEL = ModelShape.gptj_6b()
WORK = Workload(tokens_per_micro_batch=2048, micro_batches=32, in_flight=4, eight_bit_adam=True, seq_len=2048,
                checkpoint_segment=1)


def _slowest(bounds, groups, devices) -> float:
    return max(((b - a) * MODEL.layer_params + (MODEL.head_params if b == MODEL.n_layer else 0))
               / sum(devices[w].tflops for w in g) for (a, b), g in zip(bounds, groups))


def _best_by_enumeration(groups, devices) -> float | None:
    n, best = MODEL.n_layer, None
    for cuts in itertools.combinations(range(1, n), len(groups) - 1):
        edges = (0, *cuts, n)
        bounds = list(zip(edges, edges[1:]))
        if any(memory_needed_gb(MODEL, WORK, a, b) > min(devices[w].memory_gb for w in g) * HEADROOM
               for (a, b), g in zip(bounds, groups)):
            continue
        t = _slowest(bounds, groups, devices)
        best = t if best is None else min(best, t)
    return best


def _instance(seed: int):
    """2 to 3 groups of two cards would not hold GPT-J 6B at all; 4 to 6 groups of 24-48 GB cards
    do, and most seeds' best split has a stage that one more layer would not fit."""
    rng = random.Random(seed)
    stages = rng.choice((4, 5, 6))
    devices = [Device(f"d{i}", rng.choice((35.0, 71.0, 125.0, 312.0)), rng.choice((24.0, 32.0, 40.0, 48.0)))
               for i in range(stages * 2)]
    return [(2 * s, 2 * s + 1) for s in range(stages)], devices


def _at_its_memory_limit(stage, devices) -> bool:
    fits = min(devices[w].memory_gb for w in stage.workers) * HEADROOM
    return stage.start > 0 and memory_needed_gb(MODEL, WORK, stage.start - 1, stage.end) > fits


SEEDS = range(8)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_split_is_the_best_contiguous_one_that_fits(seed):
    groups, devices = _instance(seed)
    found = split_layers(groups, devices, MODEL, WORK)
    best = _best_by_enumeration(groups, devices)
    assert found is not None and best is not None
    assert [s.workers for s in found] == groups
    assert (found[0].start, found[-1].end) == (0, MODEL.n_layer)
    assert all(a.end == b.start and a.start < a.end for a, b in zip(found, found[1:]))
    assert _slowest([(s.start, s.end) for s in found], groups, devices) == pytest.approx(best, rel=1e-12)


def test_memory_binds_in_most_of_these_instances():
    """Else the test above would not exercise the walk's stop at the first start that does not fit."""
    binding = [seed for seed in SEEDS
               if any(_at_its_memory_limit(s, _instance(seed)[1]) for s in split_layers(*_instance(seed), MODEL, WORK))]
    assert len(binding) >= len(SEEDS) // 2, binding


def test_no_split_when_the_cards_cannot_hold_the_model():
    devices = [Device("small", 35.0, 4.0), Device("small2", 35.0, 4.0)]
    assert split_layers([(0,), (1,)], devices, MODEL, WORK) is None



def _search_walk(groups: list[tuple[int, ...]], steps: int, seed: int) -> list[list[tuple[int, ...]]]:
    """Candidates as a placement search makes them: each a swap of two groups' first workers or
    a 2-opt (a run of groups reversed) of the one before."""
    rng, out = random.Random(seed), []
    for _ in range(steps):
        a, b = sorted(rng.sample(range(len(groups)), 2))
        if rng.random() < 0.5:
            groups = list(groups)
            groups[a], groups[b] = (groups[b][0],) + groups[a][1:], (groups[a][0],) + groups[b][1:]
        else:
            groups = groups[:a] + groups[a:b + 1][::-1] + groups[b + 1:]
        out.append(groups)
    return out


def test_rows_reused_from_earlier_candidates_give_the_split_computed_from_nothing():
    """A search's candidates differ from one group on: the programme looks the rows before it
    up. Each split of such a walk, with the rows of the earlier ones kept, must be the split
    computed with nothing kept."""
    groups, devices = _instance(3)
    walk = _search_walk(groups, 40, seed=7)
    layer_split._PREFIX_ROWS.clear()
    layer_split._split_bounds.cache_clear()
    warm = [split_layers(g, devices, MODEL, WORK) for g in walk]
    kept = len(layer_split._PREFIX_ROWS[(MODEL, WORK)])
    assert kept < len(walk) * (len(groups) - 1), "no row was reused: the walk does not test the lookup"
    cold = []
    for g in walk:
        layer_split._PREFIX_ROWS.clear()
        layer_split._split_bounds.cache_clear()
        cold.append(split_layers(g, devices, MODEL, WORK))
    assert warm == cold
    assert sum(s is not None for s in warm) >= 30
