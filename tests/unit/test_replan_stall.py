"""What a mid-run re-plan must pay back (plan_horizon.py) and what its reloads are measured to
cost (ledger/replan_stall.py): a plan a few per cent faster must not move a run that has too few
steps left, or whose stages take longer to reload than the saving wins back."""

from __future__ import annotations

import pytest

from coordinator.cost_model import StagePlacement
from coordinator.placement import holders_reload, move_cost_s
from coordinator.plan_horizon import Horizon
from coordinator.scheduler import StagePlan, WorkerView, decide
from tests.unit.test_averaging_rate import _data_parallel_ledger, _to_averaging
from tests.unit.test_scheduler import TINY, run_config

ledger_backends = pytest.mark.usefixtures("both_ledger_backends")


def test_only_a_holder_whose_range_or_stage_changes_pays_the_reload():
    before = [StagePlacement(0, 2, (0,)), StagePlacement(2, 4, (1,))]
    newcomer = [StagePlacement(0, 2, (0, 2)), StagePlacement(2, 4, (1,))]  # 2 copies from 0
    shifted = [StagePlacement(0, 3, (0,)), StagePlacement(3, 4, (1,))]
    swapped = [StagePlacement(0, 2, (1,)), StagePlacement(2, 4, (0,))]
    assert not holders_reload(before, before) and not holders_reload(before, newcomer)
    assert holders_reload(before, shifted) and holders_reload(before, swapped)
    assert move_cost_s(before, newcomer, 2.0, 15.0) == 2 * 2.0  # the newcomer loads, nobody stops
    assert move_cost_s(before, shifted, 2.0, 15.0) == 15.0 + 1 * 2.0  # worker 0 fetches layer 2
    assert move_cost_s(before, swapped, 2.0, 0.0) == 2 * 2.0


def test_the_horizon_is_capped_by_the_steps_left():
    cfg = run_config().scheduler  # horizon_steps 50
    assert Horizon.of(cfg).steps == 50 and Horizon.of(cfg, 200).steps == 50
    assert Horizon.of(cfg, 6).steps == 6 and Horizon.of(cfg, 0).steps == 1


def test_a_faster_plan_moves_the_run_only_if_the_steps_ahead_pay_back_its_reload():
    """The worker on the first stage re-measures 1.5x faster: swapping stages saves about a third
    of a step; worth a reload over 50 steps, not over 2, nor when a reload costs a minute."""
    run = run_config()
    run.train.global_batch = 8
    workers = [WorkerView("a", "h:1", 0.008, 24), WorkerView("b", "h:2", 0.008, 24)]
    current = [StagePlan(s.start, s.end, s.workers) for s in decide(run, TINY, workers, [], None).stages]
    first = current[0].workers[0]
    faster = [WorkerView(w.id, w.address, w.tflops * (1.5 if w.id == first else 1.0), 24) for w in workers]

    def plan(horizon: Horizon) -> list:
        return [(s.start, s.end, s.workers) for s in decide(run, TINY, faster, [], current, horizon=horizon).stages]

    kept = [(s.start, s.end, s.workers) for s in current]
    moved = plan(Horizon(50, 0.0))
    assert moved != kept  # the saving is real
    saving = decide(run, TINY, faster, [], current).current_step_s - \
        decide(run, TINY, faster, [], None).predicted_step_s
    assert saving > 0.1
    assert plan(Horizon(2, 0.0, reload_s=3 * saving)) == kept  # too few steps left
    assert plan(Horizon(50, 0.0, reload_s=3 * saving)) == moved
    assert plan(Horizon(50, 0.0, reload_s=60 * saving)) == kept  # a reload too dear


@ledger_backends
def test_a_checkpoint_re_plan_is_timed_from_its_apply_to_the_next_open_and_prices_the_next(tmp_path):
    ledger, clock, ids = _data_parallel_ledger(tmp_path)
    ledger.run.train.steps = 100
    _to_averaging(ledger, ids)
    clock.t += 30.0  # a slow round: the pipeline is predicted much faster (test_averaging_rate)
    for w in ids:
        assert ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    pending = ledger.status()["plan"]["pending_ranges"]
    assert len(pending) == 2
    events = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "replan_pending"]
    assert "only shrinks ranges" in events[-1] and "moves 0 layer" not in events[-1]
    for w in ids:
        assert ledger.report(w, 0, 0, "applied", digest="d")
    ledger.record_checkpoint(1, ledger.plan[0], "step-1/0")
    assert ledger.status()["plan"]["ranges"] == pending and ledger.status()["plan"]["reload_s"] == 0.0
    clock.t += 25.0  # every stage reloads its new range from the store
    for w in ids:
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 1)
    assert ledger.phase == "open" and ledger.step == 1
    plan = ledger.status()["plan"]
    assert plan["reload_s"] == pytest.approx(25.0)  # layer_load_s 0: all of it is the reload
    measured = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "measured"]
    assert "held the run 25 s" in measured[-1], measured
    assert ledger.planner.stall.reload_s() == pytest.approx(25.0)
    # timed once: the next step's open measures nothing
    ledger.planner.stall.step_opened()
    assert len([e for e in ledger.status()["events"] if "held the run" in e["detail"]]) == 1


def checkpoint_replan_reloading(tmp_path):
    """A data-parallel ledger whose slow round made it pend a 2-stage pipeline, applied at the
    checkpoint of step 1: both workers now reload their new ranges (nobody holds a stage yet),
    and the re-plan's reload is being timed."""
    ledger, clock, ids = _data_parallel_ledger(tmp_path)
    ledger.run.train.steps = 100
    _to_averaging(ledger, ids)
    clock.t += 30.0
    for w in ids:
        assert ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    for w in ids:
        assert ledger.report(w, 0, 0, "applied", digest="d")
    ledger.record_checkpoint(1, ledger.plan[0], "step-1/0")
    assert len(ledger.status()["plan"]["ranges"]) == 2
    return ledger, clock, ids


def test_a_death_while_a_re_plan_reloads_leaves_that_re_plan_untimed(tmp_path):
    """Else the open after the failure's recovery would price every later re-plan at that recovery."""
    ledger, clock, ids = checkpoint_replan_reloading(tmp_path)
    clock.t += 5.0
    ledger.declare_dead(ids[1], "its process vanished while it reloaded")
    clock.t += 60.0  # the survivor takes the whole model back (min_stages 1)
    ledger.heartbeat(ids[0], "ready", {}, ledger.restore_epoch, 1)
    assert ledger.phase == "open" and ledger.step == 1
    assert ledger.status()["plan"]["reload_s"] == 0.0
    details = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "measured"]
    assert not any("held the run" in d for d in details), details
    assert any("is not timed" in d and "lost " + ids[1] in d for d in details), details


@ledger_backends
@pytest.mark.parametrize("steps, reload_s, pends", [(100, 0.0, True), (100, 1e5, False), (4, 1000.0, False)])
def test_the_ledger_pends_a_plan_only_when_the_steps_left_pay_back_the_measured_reload(tmp_path, steps, reload_s,
                                                                                      pends):
    """The shrink-only pipeline plan saves ~30 s a step over the data-parallel one (a 30 s round):
    over 50 steps it pays back a 1,000 s reload, over the 4 steps of a short run it does not."""
    ledger, clock, ids = _data_parallel_ledger(tmp_path)
    ledger.run.train.steps = steps
    ledger.db.set_meta("replan_reload_s", reload_s)  # as a checkpoint re-plan measured it
    _to_averaging(ledger, ids)
    clock.t += 30.0
    for w in ids:
        assert ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    plan = ledger.status()["plan"]
    assert plan["reload_s"] == reload_s and bool(plan["pending"]) is pends, plan
    if steps == 4:  # the same reload over 50 steps is paid back
        ledger.run.train.steps = 100
        ledger.planner.replan("a longer run")
        assert ledger.status()["plan"]["pending"]


@ledger_backends
def test_a_pending_plan_the_steps_left_no_longer_pay_for_is_dropped_at_the_checkpoint_and_nothing_reloads(tmp_path):
    """Pended with 50 steps of horizon; by the checkpoint the run has 1 step left, which cannot pay
    back the measured reload: the plan in force stays, the step goes on, no epoch moves."""
    ledger, clock, ids = _data_parallel_ledger(tmp_path)
    ledger.run.train.steps = 100
    ledger.db.set_meta("replan_reload_s", 1000.0)
    _to_averaging(ledger, ids)
    clock.t += 30.0
    for w in ids:
        assert ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    assert ledger.status()["plan"]["pending"]
    for w in ids:
        assert ledger.report(w, 0, 0, "applied", digest="d")
    epoch = ledger.restore_epoch
    ledger.run.train.steps = 2  # (as if the operator shortened the run: 1 step left after step 0)
    ledger.record_checkpoint(1, ledger.plan[0], "step-1/0")
    plan, events = ledger.status()["plan"], ledger.status()["events"]
    assert plan["ranges"] == [[0, 4]] and not plan["pending"] and plan["last_replan"]["at_restore"] is False
    assert ledger.restore_epoch == epoch and ledger.phase == "open" and ledger.step == 1
    dropped = [e["detail"] for e in events if e["kind"] == "replan_dropped"]
    assert len(dropped) == 1 and "nothing reloads" in dropped[0]


@pytest.mark.parametrize("layer_load_s, moves", [(0.0, True), (1e4, False)])
def test_the_plan_in_force_is_kept_unless_the_best_pays_back_its_moves(layer_load_s, moves):
    """A newcomer that cannot hold either stage's range (0.6 GB) leaves the search no option
    without moves, and its best is 5 % faster. The ledger asks to keep the plan in force
    (keep_if_faster): it used to stay only if predicted no slower, so 8 layers moved for 0.56 s a
    step; now only if the best does not pay its loads back over the horizon."""
    from tests.unit.test_vacancy_choice import NEAR, PLAN, SHAPE, SLOW, _links, _swarm
    newcomer = WorkerView("new", "h:new", SLOW, 0.6)
    everyone, links = _swarm(newcomer)
    links += _links("new", ["a1", "a2", "a3", "a4"], NEAR)
    run = run_config(stages=2, replicas=3)
    run.scheduler.layer_load_s = layer_load_s
    decision = decide(run, SHAPE, everyone, links, PLAN, keep_if_faster=True)
    kept = [(s.start, s.end, s.workers) for s in decision.stages] == [(s.start, s.end, s.workers) for s in PLAN]
    assert kept != moves and (decision.layers_moved > 0) == moves
    assert (decision.predicted_step_s < decision.current_step_s) == moves
