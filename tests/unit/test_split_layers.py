"""coordinator/layer_split.py: split_layers' dynamic programme against every contiguous split, on
random groups whose memory binds (the programme stops walking a stage's start left at the first
that does not fit)."""

from __future__ import annotations

import itertools
import random

import pytest

from coordinator.cost_model import Device, ModelShape, Workload, memory_needed_gb
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


def test_a_slow_head_moves_layers_off_the_last_stage():
    """Two equal cards; the second is measured at a fifth of its block rate on the LM head: the
    split gives it fewer blocks than it would if the head ran at the block rate, and the choice is
    the best contiguous split when the head is priced at the head rate."""
    big = 1000.0  # memory binds nowhere
    even = [Device("a", 100.0, big), Device("b", 100.0, big)]
    slow = [Device("a", 100.0, big), Device("b", 100.0, big, head_tflops=20.0)]
    groups = [(0,), (1,)]
    cut_even = split_layers(groups, even, MODEL, WORK)[0].end
    cut_slow = split_layers(groups, slow, MODEL, WORK)[0].end

    def slowest(cut: int) -> float:
        return max(cut * MODEL.layer_params / 100.0,
                   (MODEL.n_layer - cut) * MODEL.layer_params / 100.0 + MODEL.head_params / 20.0)

    assert cut_slow > cut_even
    assert slowest(cut_slow) == min(slowest(c) for c in range(1, MODEL.n_layer))
