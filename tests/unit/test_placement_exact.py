"""The exact placement solver against hand-computed optima and brute force, and the bench's
gap to it (pure)."""

import dataclasses
import json
import random

import pytest

from coordinator.cost_model import Device, Link, ModelShape, Network, Workload, memory_needed_gb
from coordinator.placement import plan
from coordinator.placement_exact import solve
from tests.unit.test_placement import MODEL, NET, WORK, exhaustive, random_devices

# By hand: 2 layers of 1e9 parameters, no embedding or head; 1000 tokens a micro-batch, so a
# layer is 6e12 FLOPs a micro-batch: 1 s on a 6 TFLOP/s device, 2 s on a 3 TFLOP/s one. Three
# micro-batches; one site whose links have 0.25 s of latency and bandwidth to spare (transfers
# and averaging cost their latency only).
HAND = ModelShape(n_layer=2, d_model=1000, layer_params=10**9, embed_params=0, head_params=0)
HAND_WORK = Workload(tokens_per_micro_batch=1000, micro_batches=3, in_flight=1, precision="fp32")
HAND_NET = Network({}, inside=Link(0.25, 1e9))


def hand_devices(memory_gb: float) -> list[Device]:
    return [Device("fast", 6.0, memory_gb, "a"), Device("slow", 3.0, memory_gb, "a")]


def test_the_optimum_by_hand():
    """Step = sum(compute) + 2 sum(transfer) + (M - 1) x slowest + averaging. Both devices on one
    stage: 12e12 FLOPs / 9 TFLOP/s = 4/3 s, x 3 micro-batches = 4 s, + ring all-reduce of two
    (2 x 1 x 0.25 s latency) = 4.5 s. The fast one alone: 2 s x 3 = 6 s. A pipeline fast -> slow
    (or slow -> fast): 1 + 2 + 2 x 0.25 + 2 x 2 = 7.5 s. The slow one alone: 12 s."""
    best = solve(hand_devices(1000.0), HAND_NET, HAND, HAND_WORK)
    assert best.step_s == pytest.approx(4.5)
    assert [(s.start, s.end, s.workers) for s in best.stages] == [(0, 2, (0, 1))]
    # stage counts and group caps as plan() takes them
    assert solve(hand_devices(1000.0), HAND_NET, HAND, HAND_WORK, stage_counts=[2]).step_s == pytest.approx(7.5)
    alone = solve(hand_devices(1000.0), HAND_NET, HAND, HAND_WORK, max_group=1)
    assert alone.step_s == pytest.approx(6.0) and [s.workers for s in alone.stages] == [(0,)]
    assert solve(hand_devices(1000.0), HAND_NET, HAND, HAND_WORK, gone=frozenset({0})).step_s == pytest.approx(12.0)


def test_memory_leaves_only_the_pipelines():
    """Each device holds one layer, not two: only the two-stage pipelines fit (7.5 s)."""
    one = memory_needed_gb(HAND, HAND_WORK, 0, 1)
    two = memory_needed_gb(HAND, HAND_WORK, 0, 2)
    assert one < two
    devices = hand_devices((one + two) / 2 / 0.9)  # a plan uses 90 % of a device (MEMORY_HEADROOM)
    best = solve(devices, HAND_NET, HAND, HAND_WORK)
    assert best.step_s == pytest.approx(7.5) and len(best.stages) == 2
    with pytest.raises(ValueError, match="fits their memory"):
        solve(devices, HAND_NET, HAND, HAND_WORK, stage_counts=[1])


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_brute_force(seed):
    """Brute force (test_placement.exhaustive) tries every ordered partition of every subset of
    4 workers and every layer split, with no symmetry and no pruning."""
    devices = random_devices(random.Random(seed), 4)
    brute = exhaustive(devices)
    if brute == float("inf"):
        with pytest.raises(ValueError):
            solve(devices, NET, MODEL, WORK)
        return
    best = solve(devices, NET, MODEL, WORK)
    assert best.step_s == pytest.approx(brute, rel=1e-12)
    # a good first bound prunes more and changes nothing
    assert solve(devices, NET, MODEL, WORK, incumbent=plan(devices, NET, MODEL, WORK).stages).step_s \
        == pytest.approx(brute, rel=1e-12)


def test_identical_devices_are_enumerated_once_and_nothing_is_lost():
    """The solver takes one member of each set of interchangeable devices (same speed, memory
    and site); brute force, which does not, finds the same optimum on 5 workers in 3 kinds."""
    devices = [Device("a0", 60.0, 48.0, "a"), Device("a1", 60.0, 48.0, "a"), Device("b0", 120.0, 80.0, "b"),
               Device("b1", 120.0, 80.0, "b"), Device("c0", 30.0, 80.0, "c")]
    assert solve(devices, NET, MODEL, WORK).step_s == pytest.approx(exhaustive(devices), rel=1e-12)


def test_the_search_never_beats_the_optimum_on_random_swarms():
    rng = random.Random(5)
    for _ in range(4):
        devices = random_devices(rng, 6)
        ours = plan(devices, NET, MODEL, WORK)
        best = solve(devices, NET, MODEL, WORK)
        assert best.step_s <= ours.step_s * (1 + 1e-12)


def test_bench_small_instances_gap_is_never_negative():
    """bench scheduler's gap_vs_optimal: ours can never beat a proven optimum, so a negative gap
    would mean the solver is not exact (or the two disagree on the space of plans)."""
    from bench.scheduler import SCENARIOS, optimality_gaps

    gaps = optimality_gaps(json.loads(SCENARIOS.read_text()))
    assert len(gaps) == 6 and all(6 <= g["workers"] <= 8 for g in gaps.values())
    for name, g in gaps.items():
        assert g["gap_vs_optimal"] >= -1e-12, (name, g)
        assert g["optimal_step_s"] <= g["predicted_step_s"] * (1 + 1e-12), (name, g)


@pytest.mark.parametrize("seed", range(10, 18))
def test_agrees_with_brute_force_when_heads_run_at_rates_of_their_own(seed):
    """Workers whose LM head runs at 5x, 1/20 or 1/50 of their block rate, or unmeasured. Pricing
    the layers left with every free worker's head rate bounds the slowest stage too high: on
    seed 14 the solver then pruned the optimum (10.808 s found against 10.772 s), which
    placement_exact.compute_left does not (0 of 300 such instances differ from brute force)."""
    rng = random.Random(1000 + seed)
    devices = [dataclasses.replace(d, head_tflops=rng.choice([0.0, d.tflops * 5, d.tflops / 20, d.tflops / 50]))
               for d in random_devices(rng, 4)]
    brute = exhaustive(devices)
    if brute == float("inf"):
        return
    assert solve(devices, NET, MODEL, WORK).step_s == pytest.approx(brute, rel=1e-12)
