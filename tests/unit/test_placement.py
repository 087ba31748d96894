"""Placement search against exhaustive search, memory limits and heterogeneous speeds (pure)."""

import itertools
import random
import threading
import time

import pytest

from coordinator import placement
from coordinator.cost_model import Device, Link, ModelShape, Network, StagePlacement, Workload, infeasible, predict_step
from coordinator.placement import layers_moved, move_stall_layers, plan, replan, split_layers
from gptjt_core.config import SchedulerConfig

MODEL = ModelShape(n_layer=6, d_model=1000, layer_params=10**9, embed_params=10**8, head_params=10**8)
WORK = Workload(tokens_per_micro_batch=2000, micro_batches=16, in_flight=2, precision="fp32")  # no autocast copies
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
            plan(devices, NET, MODEL, WORK, seed=seed)
        return
    got = plan(devices, NET, MODEL, WORK, seed=seed)
    assert got.step_s == pytest.approx(best, rel=1e-6), (got.stages, devices)


def test_memory_limits_are_never_violated():
    rng = random.Random(7)
    for _ in range(5):
        devices = random_devices(rng, 12)
        got = plan(devices, NET, MODEL, WORK)
        assert infeasible(got.stages, devices, MODEL, WORK) == ""


def test_a_device_too_small_for_any_layer_gets_no_stage_and_a_reason():
    devices = [Device("big", 100.0, 80.0, "a"), Device("tiny", 100.0, 4.0, "a"), Device("big2", 100.0, 80.0, "a")]
    got = plan(devices, NET, MODEL, WORK)
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
    first = plan(devices, NET, MODEL, WORK)
    # a worker leaves: nobody else needs to move far, and loading is expensive
    gone = frozenset({first.stages[0].workers[0]})
    again = replan(first.stages, devices, NET, MODEL, WORK, seconds_per_layer_load=1e6, horizon_steps=10, gone=gone)
    assert not gone & {w for s in again.stages for w in s.workers}
    assert layers_moved(first.stages, again.stages) <= layers_moved(
        first.stages, plan(devices, NET, MODEL, WORK, gone=gone).stages)
    cheap = replan(first.stages, devices, NET, MODEL, WORK, seconds_per_layer_load=0.0, horizon_steps=10, gone=gone)
    assert cheap.step_s <= again.step_s + 1e-9


def test_a_move_is_priced_by_the_most_layers_one_worker_loads_not_by_their_sum():
    """Workers load in parallel, so a move stalls the run for the longest single load. Here the
    layers are split 5 / 1 over two groups of 4; the 3 / 3 split makes stage 1's four workers
    load 2 layers each: a stall of 2 loads, though 8 are loaded."""
    devices = [Device(f"w{i}", 60.0, 200.0, "a") for i in range(8)]
    current = [StagePlacement(0, 5, (0, 1, 2, 3)), StagePlacement(5, 6, (4, 5, 6, 7))]
    even = [StagePlacement(0, 3, (0, 1, 2, 3)), StagePlacement(3, 6, (4, 5, 6, 7))]
    assert (move_stall_layers(current, even), layers_moved(current, even)) == (2, 8)
    assert move_stall_layers(current, current) == 0
    keep = predict_step(current, devices, NET, MODEL, WORK).step_s
    better = predict_step(even, devices, NET, MODEL, WORK).step_s
    gain = (keep - better) * 10  # over a horizon of 10 steps
    load_s = gain / 5  # the stall (2 loads) pays; the sum (8) would not
    got = replan(current, devices, NET, MODEL, WORK, seconds_per_layer_load=load_s, horizon_steps=10,
                 stage_counts=[2], max_group=4)
    assert got.step_s == pytest.approx(better) and [(s.start, s.end) for s in got.stages] == [(0, 3), (3, 6)]
    slow_loads = replan(current, devices, NET, MODEL, WORK, seconds_per_layer_load=gain / 1.5, horizon_steps=10,
                        stage_counts=[2], max_group=4)
    assert slow_loads.step_s == pytest.approx(keep)  # a stall of 2 loads costs more than it saves


# -- an iteration budget, not the clock, ends the search: same inputs, same plan -------------------

GPTJ = ModelShape.gptj_6b()


class FastClock:
    """A clock that advances `step` seconds at every read: a machine that much slower."""

    def __init__(self, step: float):
        self.now, self.step, self.reads = 0.0, step, 0

    def __call__(self) -> float:
        self.now += self.step
        self.reads += 1
        return self.now


def same_plan(a, b) -> bool:
    return (a.stages, a.step_s, a.standby, a.evaluations) == (b.stages, b.step_s, b.standby, b.evaluations)


def test_a_slow_clock_does_not_change_the_plan():
    """10 ms pass at every clock read: the search sees seconds go by (a wall-clock budget
    like the old 0.3 s would have stopped it early) and still returns the same plan."""
    devices = random_devices(random.Random(11), 24)
    plain = plan(devices, NET, MODEL, WORK, evaluations=200)
    clock = FastClock(0.01)
    slow = plan(devices, NET, MODEL, WORK, evaluations=200, backstop_s=60.0, clock=clock)
    assert clock.now > 1.0 and not slow.backstop_hit
    assert slow.evaluations == 200  # the count ended both searches: the instance is not solved in fewer
    assert same_plan(plain, slow)
    assert same_plan(plain, plan(devices, NET, MODEL, WORK, evaluations=200))  # and again


def test_a_busy_thread_on_the_cpu_does_not_change_the_plan():
    """A thread that competes for the interpreter makes the search slower in wall time, not
    different."""
    devices = random_devices(random.Random(11), 32)
    plain = plan(devices, NET, GPTJ, WORK, evaluations=300, backstop_s=60.0)  # far off: only the load varies
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(10_000))

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        loaded = plan(devices, NET, GPTJ, WORK, evaluations=300, backstop_s=60.0)
    finally:
        stop.set()
        busy.join()
    assert loaded.evaluations == 300 and not loaded.backstop_hit
    assert same_plan(plain, loaded)


def test_every_candidate_takes_one_evaluation_the_2opt_pass_included(monkeypatch):
    """Each evaluation more in the budget scores exactly one candidate more. The first refined
    stage count has 6 groups, so its 2-opt pass alone has 15 candidates: a pass that ignored
    the budget would score them all at once."""
    devices = random_devices(random.Random(11), 24)
    calls = []
    scored = placement.evaluate
    monkeypatch.setattr(placement, "evaluate", lambda *a, **k: calls.append(1) or scored(*a, **k))

    def count(evaluations: int) -> int:
        calls.clear()
        assert plan(devices, NET, MODEL, WORK, evaluations=evaluations).evaluations == evaluations
        return len(calls)

    base = count(0)
    assert [count(n) - base for n in range(1, 20)] == list(range(1, 20))


def test_the_backstop_stops_a_search_whose_budget_is_huge():
    devices = random_devices(random.Random(11), 32)
    # a clock that gains a second at every read: the 10 s backstop passes after ~10 reads
    got = plan(devices, NET, GPTJ, WORK, evaluations=10**9, backstop_s=10.0, clock=FastClock(1.0))
    assert got.backstop_hit and got.evaluations < 10
    assert infeasible(got.stages, devices, GPTJ, WORK) == ""
    # the real clock: unbounded, this search runs for minutes (~10^4 evaluations a second on this
    # machine); a 0.05 s backstop stops it after a few hundred
    started = time.perf_counter()
    got = plan(devices, NET, GPTJ, WORK, evaluations=10**9, backstop_s=0.05)
    assert got.backstop_hit and got.evaluations < 5000
    assert time.perf_counter() - started < 0.05 + 2.0  # + one evaluation and the polish, on a busy machine
    assert infeasible(got.stages, devices, GPTJ, WORK) == ""


def test_defaults_are_the_coordinators():
    """bench scheduler measures the coordinator's defaults; plan()'s own must be the same."""
    cfg = SchedulerConfig()
    assert (placement.EVALUATIONS, placement.BACKSTOP_S) == (cfg.search_evaluations, cfg.search_budget_s)
