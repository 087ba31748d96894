"""Which standby worker fills a short stage between searches (coordinator/vacancy_choice.py): the
one the cost model prices best on the measured links, not the longest-waiting one; a stage with
replicas declines a worker that would slow its step, and one it cannot price."""

from __future__ import annotations

import pytest

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
    group the pricer left short on purpose; when the ledger asks to keep (its plan could start),
    the plan in force, predicted faster, stays."""
    from coordinator.scheduler import decide
    far = WorkerView("far", "h:far", FAST, 24)
    everyone, links = _swarm(far)
    links += _links("far", ["a1", "a2", "a3", "a4"], FAR)
    decision = decide(run_config(stages=2, replicas=3), SHAPE, everyone, links, PLAN, keep_if_faster=True)
    assert [s.workers for s in decision.stages] == [s.workers for s in PLAN]
    assert decision.predicted_step_s == decision.current_step_s and decision.layers_moved == 0
    assert "far" in decision.standby
    # when the ledger does not ask to keep (its plan lacks start_with_replicas a stage) the
    # search's full groups win
    assert "far" in {w for s in decide(run_config(stages=2, replicas=3), SHAPE, everyone, links, PLAN).stages
                     for w in s.workers}


def test_a_pending_plan_is_priced_again_without_the_workers_it_lost():
    """A plan found by an earlier search and pended (proposals) is priced with today's figures,
    without a worker that left since; here it beats both the plan in force and the search, which
    must fill every group and so takes the far worker."""
    from coordinator.scheduler import decide
    far = WorkerView("far", "h:far", FAST, 24)
    everyone, links = _swarm(far)
    links += _links("far", ["a1", "a2", "a3", "a4"], FAR)
    run = run_config(stages=2, replicas=3)
    lopsided = [StagePlan(0, 1, ("a1", "a3")), StagePlan(1, 8, ("a2", "a4"))]
    kept = decide(run, SHAPE, everyone, links, lopsided, keep_if_faster=True)
    assert [s.workers for s in kept.stages] == [s.workers for s in lopsided]  # the search found nothing faster
    pending = [StagePlan(0, 6, ("a1", "a3", "gone")), StagePlan(6, 8, ("a2", "a4"))]
    decision = decide(run, SHAPE, everyone, links, lopsided, keep_if_faster=True, proposals=(pending,))
    assert [(s.start, s.end, s.workers) for s in decision.stages] == [(0, 6, ("a1", "a3")), (6, 8, ("a2", "a4"))]
    assert decision.predicted_step_s < kept.predicted_step_s and decision.layers_moved > 0
    # ... and without a worker that cannot hold its stage now (2 GB: layers 6-8, not 0-6)
    small = WorkerView("small", "h:small", SLOW, 2.0)
    with_small = everyone + [small]
    near_small = links + _links("small", ["a1", "a2", "a3", "a4"], NEAR)
    misfit = [StagePlan(0, 6, ("a1", "a3", "small")), StagePlan(6, 8, ("a2", "a4"))]
    decision = decide(run, SHAPE, with_small, near_small, lopsided, keep_if_faster=True, proposals=(misfit,))
    assert [(s.start, s.end, s.workers) for s in decision.stages] == [(0, 6, ("a1", "a3")), (6, 8, ("a2", "a4"))]
    # a pending plan that lost a whole group is not priced
    gone = [StagePlan(0, 6, ("gone",)), StagePlan(6, 8, ("a2", "a4"))]
    assert decide(run, SHAPE, everyone, links, lopsided, keep_if_faster=True,
                  proposals=(gone,)).stages == kept.stages


def _loading_swarm(tmp_path, replicas: int, start_with: int = 1) -> tuple[RunLedger, Clock, dict]:
    """a1-a4 placed by join order, loading (the first step has not opened), near each other; then
    a merged search (replan_every_s 60 s) applies the plan (0-6, 6-8)."""
    clock = Clock()
    run = run_config(stages=2, replicas=replicas, replan_every_s=60.0)
    run.pipeline.start_with_replicas = start_with
    ledger = RunLedger(tmp_path / "run.db", run, plan_stages(8, 2), clock, shape=SHAPE)
    ids = {n: ledger.join(n, f"h:{n}", device(SLOW))["id"] for n in ("a1", "a2", "a3", "a4")}
    for a in ids:
        _measure(ledger, ids, a, [o for o in ids if o != a], NEAR)
    clock.t += 61
    assert ledger.planner.replan_if_due() and [(s.start, s.end) for s in ledger.plan] == [(0, 6), (6, 8)]
    assert ledger.phase == "waiting"
    return ledger, clock, ids


def _measure(ledger: RunLedger, ids: dict, name: str, others: list[str], kind: dict) -> None:
    state = "loading" if name.startswith("a") else "standby"
    ledger.heartbeat(ids[name], state, {}, -1, -1,
                     links=[{"address": f"h:{o}", **kind, "measured_unix_s": ledger.clock()} for o in others])


def test_before_the_first_step_a_departure_is_filled_by_the_priced_worker_once_a_plan_applied(tmp_path):
    """Join order would take `far` (it joined first). bench churn: a far filler before the first
    step made the plan in force look 2-3x slower, and the next search moved 130-220 layers."""
    ledger, _, ids = _loading_swarm(tmp_path, replicas=2)
    for name, kind in (("far", FAR), ("near", NEAR)):
        ids[name] = ledger.join(name, f"h:{name}", device(FAST if name == "far" else SLOW))["id"]
        _measure(ledger, ids, name, ["a1", "a2", "a3", "a4"], kind)
    leaving = next(n for n in ("a1", "a3") if ledger.assignment(ids[n])["stage"] == 0)
    ledger.leave(ids[leaving])
    assert ledger.assignment(ids["near"])["stage"] == 0 and ledger.assignment(ids["far"])["stage"] == -1


@pytest.mark.parametrize("start_with", [1, 3])
def test_before_the_first_step_a_plan_that_could_start_stays_over_a_slower_search(tmp_path, start_with):
    """The search fills groups to replicas_per_stage (3) and so places the far worker; the plan in
    force (2 replicas a stage) is faster and stays if it could start (start_with_replicas 1). With
    start_with_replicas 3 it could not, and the search's full groups win (the chaos soak's case)."""
    ledger, clock, ids = _loading_swarm(tmp_path, replicas=3, start_with=start_with)
    plan = [ledger.assignment(ids[n])["stage"] for n in ("a1", "a2", "a3", "a4")]
    ids["far"] = ledger.join("far", "h:far", device(FAST))["id"]
    _measure(ledger, ids, "far", ["a1", "a2", "a3", "a4"], FAR)
    clock.t += 61
    assert ledger.planner.replan_if_due()
    assert (ledger.assignment(ids["far"])["stage"] == -1) == (start_with == 1)
    if start_with == 1:
        assert [ledger.assignment(ids[n])["stage"] for n in ("a1", "a2", "a3", "a4")] == plan
