"""Placement search against exhaustive search, memory limits and heterogeneous speeds (pure)."""

import itertools
import random

import pytest

from coordinator.cost_model import Device, Link, ModelShape, Network, StagePlacement, Workload, infeasible, predict_step
from coordinator.placement import layers_moved, plan, replan, split_layers

MODEL = ModelShape(n_layer=6, d_model=1000, layer_params=10**9, embed_params=10**8, head_params=10**8)
WORK = Workload(tokens_per_micro_batch=2000, micro_batches=16, in_flight=2)
NET = Network({("a", "b"): Link(0.05, 0.5), ("a", "c"): Link(0.1, 0.3), ("b", "c"): Link(0.02, 2.0)},
              inside=Link(0.001, 10.0))


def random_devices(rng: random.Random, n: int) -> list[Device]:
    return [Device(f"w{i}", rng.choice([30.0, 60.0, 120.0]), rng.choice([24.0, 48.0, 80.0]), rng.choice("abc"))
            for i in range(n)]


def exhaustive(devices: list[Device]) -> float:
    """The best predicted step over every ordered partition of the workers into stages and
    every layer split (workers may also be left out)."""
    best = float("inf")
    n = len(devices)
    for used in range(1, n + 1):
        for ids in itertools.permutations(range(n), used):
            for s in range(1, min(used, MODEL.n_layer) + 1):
                for sizes in itertools.combinations(range(1, used), s - 1):
                    bounds = (0, *sizes, used)
                    groups = [tuple(sorted(ids[a:b])) for a, b in zip(bounds, bounds[1:])]
                    for cuts in itertools.combinations(range(1, MODEL.n_layer), s - 1):
                        lb = (0, *cuts, MODEL.n_layer)
                        stages = [StagePlacement(a, b, g) for (a, b), g in zip(zip(lb, lb[1:]), groups)]
                        if not infeasible(stages, devices, MODEL, WORK):
                            best = min(best, predict_step(stages, devices, NET, MODEL, WORK).step_s)
    return best


@pytest.mark.parametrize("seed", range(10))
def test_agrees_with_exhaustive_search_on_small_instances(seed):
    devices = random_devices(random.Random(seed), 4)
    best = exhaustive(devices)
    if best == float("inf"):  # the workers cannot hold the model together
        with pytest.raises(ValueError, match="fits the workers' memory"):
            plan(devices, NET, MODEL, WORK, budget_s=1.0, seed=seed)
        return
    got = plan(devices, NET, MODEL, WORK, budget_s=1.0, seed=seed)
    assert got.step_s == pytest.approx(best, rel=1e-6), (got.stages, devices)


def test_memory_limits_are_never_violated():
    rng = random.Random(7)
    for _ in range(5):
        devices = random_devices(rng, 12)
        got = plan(devices, NET, MODEL, WORK, budget_s=0.2)
        assert infeasible(got.stages, devices, MODEL, WORK) == ""


def test_a_device_too_small_for_any_layer_gets_no_stage_and_a_reason():
    devices = [Device("big", 100.0, 80.0, "a"), Device("tiny", 100.0, 4.0, "a"), Device("big2", 100.0, 80.0, "a")]
    got = plan(devices, NET, MODEL, WORK, budget_s=0.2)
    assert 1 not in {w for s in got.stages for w in s.workers}
    assert got.standby == (1,) and "tiny has 4 GB" in got.why_standby[1] and "standby" in got.why_standby[1]
    with pytest.raises(ValueError, match="no worker can hold even one layer"):
        plan([devices[1]], NET, MODEL, WORK)


def test_layers_follow_speed_on_heterogeneous_devices():
    devices = [Device("fast", 120.0, 80.0, "a"), Device("slow", 40.0, 80.0, "a")]
    stages = split_layers([(0,), (1,)], devices, MODEL, WORK)
    sizes = {s.workers[0]: s.end - s.start for s in stages}
    assert sizes == {0: 4, 1: 2} or sizes == {0: 5, 1: 1}  # ~3:1 in speed, 6 layers + head
    assert sizes[0] > sizes[1]


def test_replan_keeps_the_plan_when_moving_does_not_pay():
    rng = random.Random(3)
    devices = random_devices(rng, 8)
    first = plan(devices, NET, MODEL, WORK, budget_s=0.3)
    # a worker leaves: nobody else needs to move far, and loading is expensive
    gone = frozenset({first.stages[0].workers[0]})
    again = replan(first.stages, devices, NET, MODEL, WORK, seconds_per_layer_load=1e6, horizon_steps=10, gone=gone)
    assert not gone & {w for s in again.stages for w in s.workers}
    assert layers_moved(first.stages, again.stages) <= layers_moved(
        first.stages, plan(devices, NET, MODEL, WORK, budget_s=0.3, gone=gone).stages)
    cheap = replan(first.stages, devices, NET, MODEL, WORK, seconds_per_layer_load=0.0, horizon_steps=10, gone=gone)
    assert cheap.step_s <= again.step_s + 1e-9
