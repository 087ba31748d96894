"""Which standby worker fills a short stage between searches (coordinator/vacancy_choice.py): the
one the cost model prices best on the measured links, not the longest-waiting one; a stage with
replicas declines a worker that would slow its step, and one it cannot price."""

from __future__ import annotations

from coordinator.ledger import RunLedger
from coordinator.scheduler import LinkView, StagePlan, WorkerView, model_shape, plan_stages
from coordinator.vacancy_choice import ReplicaPricer
from tests.unit.test_ledger import Clock
from tests.unit.test_scheduler import device, run_config

# activations and gradients big enough for a 5 Mbit/s link to dominate the step, on workers slow
# enough (0.01 TFLOP/s) for a replica's compute to pay for its share of the averaging
SHAPE = model_shape(8, 1024, 4096, 50400)
SLOW, FAST = 0.01, 0.02
NEAR = dict(latency_ms=1.0, mbit=2000.0)
FAR = dict(latency_ms=150.0, mbit=5.0)


def _links(src: str, dsts: list[str], kind: dict) -> list[LinkView]:
    return [LinkView(src, f"h:{d}", kind["latency_ms"], kind["mbit"]) for d in dsts]


def _swarm(*standby: WorkerView) -> tuple[list[WorkerView], list[LinkView]]:
    """a1-a4 in one site (they measured each other), holding 2 stages x 2; then `standby`."""
    placed = [WorkerView(f"a{i}", f"h:a{i}", SLOW, 24, stage=(i - 1) % 2) for i in range(1, 5)]
    links = [link for w in placed for link in _links(w.id, [o.id for o in placed if o.id > w.id], NEAR)]
    return placed + list(standby), links


PLAN = [StagePlan(0, 4, ("a1", "a3")), StagePlan(4, 8, ("a2", "a4"))]


def test_a_short_stage_takes_the_near_worker_not_the_longest_waiting_faster_far_one():
    far, near = WorkerView("far", "h:far", FAST, 24), WorkerView("near", "h:near", SLOW, 24)
    everyone, links = _swarm(far, near)
    links += _links("far", ["a1"], FAR) + _links("near", ["a1"], NEAR)
    pricer = ReplicaPricer(run_config(stages=2, replicas=3), SHAPE, everyone, links)
    assert pricer.choose(PLAN, 0, [far, near], lambda w: True) == near  # a third replica pays off
    # a stage left with one replica takes the near one too
    one = [StagePlan(0, 4, ("a1",)), PLAN[1]]
    assert pricer.choose(one, 0, [far, near], lambda w: True) == near
    # ... and only what fits: with the near one ruled out, the far one is the best there is
    assert pricer.choose(one, 0, [far, near], lambda w: w.id != "near") == far


def test_a_stage_with_replicas_declines_a_worker_that_would_slow_it_but_a_lone_replica_takes_it():
    far = WorkerView("far", "h:far", FAST, 24)
    everyone, links = _swarm(far)
    links += _links("far", ["a1"], FAR)
    pricer = ReplicaPricer(run_config(stages=2, replicas=3), SHAPE, everyone, links)
    assert pricer.choose(PLAN, 0, [far], lambda w: True) is None  # 2 replicas: the step is faster without
    one = [StagePlan(0, 4, ("a1",)), PLAN[1]]
    assert pricer.choose(one, 0, [far], lambda w: True) == far  # a second copy of the state first


def test_a_worker_nobody_can_price_waits_unless_the_stage_needs_a_second_copy():
    new = WorkerView("new", "h:new", FAST, 24)  # it has measured nothing yet
    everyone, links = _swarm(new)
    pricer = ReplicaPricer(run_config(stages=2, replicas=3), SHAPE, everyone, links)
    assert pricer.choose(PLAN, 0, [new], lambda w: True) is None
    assert pricer.choose([StagePlan(0, 4, ("a1",)), PLAN[1]], 0, [new], lambda w: True) == new
    assert pricer.choose([StagePlan(0, 4, ()), PLAN[1]], 0, [new], lambda w: True) == new  # an empty stage
    assert pricer.choose([StagePlan(0, 4, ()), PLAN[1]], 0, [new], lambda w: False) is None


def test_the_ledger_fills_a_departure_with_the_priced_worker(tmp_path):
    """Wired in: after the first step opened, a departure between searches (replan_every_s) is
    filled by StagePlanner.fill_vacancies through the pricer. Join order would take `far`."""
    run = run_config(stages=2, replicas=2, replan_every_s=600.0)
    ledger = RunLedger(tmp_path / "run.db", run, plan_stages(8, 2), Clock(), shape=SHAPE)
    ids = {n: ledger.join(n, f"h:{n}", device(SLOW))["id"] for n in ("a1", "a2", "a3", "a4")}
    ids["far"] = ledger.join("far", "h:far", device(FAST))["id"]
    ids["near"] = ledger.join("near", "h:near", device(SLOW))["id"]
    assert [ledger.assignment(ids[n])["stage"] for n in ("far", "near")] == [-1, -1]

    def measure(name: str, others: list[str], kind: dict) -> None:
        ledger.heartbeat(ids[name], "ready" if name.startswith("a") else "standby", {}, ledger.restore_epoch, 0,
                         links=[{"address": f"h:{o}", **kind, "measured_unix_s": ledger.clock()} for o in others])

    for a in ("a1", "a2", "a3", "a4"):
        measure(a, [o for o in ("a1", "a2", "a3", "a4") if o != a], NEAR)
    measure("far", ["a1", "a2", "a3", "a4"], FAR)
    measure("near", ["a1", "a2", "a3", "a4"], NEAR)
    assert ledger.phase == "open"
    leaving = next(n for n in ("a1", "a3") if ledger.assignment(ids[n])["stage"] == 0)
    ledger.leave(ids[leaving])
    assert ledger.assignment(ids["near"])["stage"] == 0 and ledger.assignment(ids["far"])["stage"] == -1


def test_a_search_keeps_the_plan_in_force_when_its_own_is_predicted_slower():
    """The search fills every group up to replicas_per_stage, so it would put the far worker into a
    group the pricer left short on purpose; once the first step opened, the plan in force,
    predicted faster, stays."""
    from coordinator.scheduler import decide
    far = WorkerView("far", "h:far", FAST, 24)
    everyone, links = _swarm(far)
    links += _links("far", ["a1", "a2", "a3", "a4"], FAR)
    decision = decide(run_config(stages=2, replicas=3), SHAPE, everyone, links, PLAN, keep_if_faster=True)
    assert [s.workers for s in decision.stages] == [s.workers for s in PLAN]
    assert decision.predicted_step_s == decision.current_step_s and decision.layers_moved == 0
    assert "far" in decision.standby
    # before the first step (the ledger does not ask to keep) the search's full groups win: the
    # first step waits for start_with_replicas replicas a stage
    assert "far" in {w for s in decide(run_config(stages=2, replicas=3), SHAPE, everyone, links, PLAN).stages
                     for w in s.workers}
