"""What a re-plan costs the coordinator as the swarm grows: joins and deaths that change nothing
a search sees reuse its answer (scheduler.DecisionMemo), and with scheduler.replan_every_s the
searches asked for within that long are merged into one the reaper runs (bench churn found a
full placement search on every join and every measurement: ~1 s of CPU each at 64 candidates)."""

from __future__ import annotations

import pytest

from coordinator.scheduler import DecisionMemo, WorkerView, decide
from tests.unit.test_scheduler import TINY, device, make_ledger, run_config


def _workers(rates: list[float]) -> list[WorkerView]:
    return [WorkerView(f"w{i}", f"h:{i}", rate, 24) for i, rate in enumerate(rates)]


def test_the_same_candidates_get_the_earlier_answer_without_a_search():
    run, memo = run_config(stages=2, replicas=2), DecisionMemo()
    workers = _workers([4.0, 3.0, 2.0, 1.0])
    first = decide(run, TINY, workers, [], None, memo)
    assert (memo.searches, memo.hits) == (1, 0)
    again = decide(run, TINY, workers, [], None, memo)
    assert (memo.searches, memo.hits) == (1, 1)
    assert [(s.start, s.end, s.workers) for s in again.stages] == [(s.start, s.end, s.workers) for s in first.stages]
    assert again.predicted_step_s == first.predicted_step_s
    # A newcomer slower than the 4 (= 2 stages x 2 replicas) it would have to displace changes
    # nothing the search sees: the same answer, and it is told why it waits.
    slow = decide(run, TINY, workers + [WorkerView("late", "h:9", 0.5, 24)], [], None, memo)
    assert (memo.searches, memo.hits) == (1, 2) and "late" in slow.standby
    assert "late" not in first.standby  # the answers handed out are copies
    # A faster one does: a new search, which places it.
    fast = decide(run, TINY, workers + [WorkerView("quick", "h:8", 9.0, 24)], [], None, memo)
    assert memo.searches == 2 and any("quick" in s.workers for s in fast.stages)


def test_a_changed_plan_in_force_or_link_is_a_new_search():
    run, memo = run_config(stages=2, replicas=1), DecisionMemo()
    workers = _workers([2.0, 1.0])
    first = decide(run, TINY, workers, [], None, memo)
    decide(run, TINY, workers, [], first.stages, memo)
    assert memo.searches == 2
    from coordinator.scheduler import LinkView
    decide(run, TINY, workers, [LinkView("w0", "h:1", 80.0, 10.0)], first.stages, memo)
    assert memo.searches == 3


def _searches(ledger) -> int:
    return ledger.planner.memo.searches


def test_searches_asked_for_within_replan_every_s_are_merged_into_one_the_reaper_runs(tmp_path):
    ledger = make_ledger(tmp_path, replan_every_s=5.0)
    clock, memo = ledger.db.clock, ledger.planner.memo
    a = ledger.join("w0", "h:0", device(0.01))["id"]  # asks at once (one worker: no plan yet)
    assert ledger.planner.replan_due == ""
    b = ledger.join("w1", "h:1", device(0.02))["id"]  # within 5 s of that: merged
    assert ledger.planner.replan_due == f"{b} joined" and memo.searches == 0
    # Meanwhile an empty stage still takes a standby worker at once (no search needed).
    assert {ledger.assignment(a)["stage"], ledger.assignment(b)["stage"]} == {0, 1}
    ledger.reap()
    assert memo.searches == 0  # not due yet
    clock.t += 5.0
    ledger.reap()
    assert memo.searches == 1 and ledger.planner.replan_due == ""
    for i in (2, 3):
        ledger.join(f"w{i}", f"h:{i}", device(0.01 * i))
    assert memo.searches == 1 and ledger.planner.replan_due
    clock.t += 5.0
    ledger.reap()
    asked = memo.searches + memo.hits
    assert asked > 1 and ledger.planner.replan_due == "" and float(ledger.db.meta("last_search_at")) == clock.t
    ledger.reap()
    assert memo.searches + memo.hits == asked  # nothing more was asked for


def test_replan_every_s_zero_searches_on_every_request(tmp_path):
    ledger = make_ledger(tmp_path)
    asked = []
    for i in range(3):
        ledger.join(f"w{i}", f"h:{i}", device(0.01 * (i + 1)))
        assert ledger.planner.replan_due == ""
        asked.append(ledger.planner.memo.searches + ledger.planner.memo.hits)
    assert asked[0] == 0 < asked[1] < asked[2]  # the first join had too few workers for a plan


def test_once_the_first_step_opened_searches_are_merged_within_replan_every_running_s(tmp_path):
    ledger = make_ledger(tmp_path, replan_every_s=5.0, replan_every_running_s=20.0)
    ledger.run.coordinator.heartbeat_timeout_s = 600.0  # nobody dies in this test
    ledger.run.train.steps = 100  # (4 steps are too few for the newcomer's plan to pay back its moves)
    clock, memo = ledger.db.clock, ledger.planner.memo
    ids = [ledger.join(f"w{i}", f"h:{i}", device(0.01))["id"] for i in range(2)]
    assert ledger.planner.merged_search_at() == float(ledger.db.meta("last_search_at")) + 5.0  # start-up
    clock.t += 5.0
    ledger.reap()
    assert memo.searches == 1 and ledger.planner.merged_search_at() is None
    for w in ids:
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 0)
    assert ledger.phase == "open"
    last = float(ledger.db.meta("last_search_at"))
    ledger.join("w2", "h:2", device(0.02))  # a newcomer after the first step: merged for 20 s, not 5
    assert ledger.planner.replan_due and ledger.planner.merged_search_at() == last + 20.0
    clock.t = last + 5.0
    ledger.reap()
    assert memo.searches + memo.hits == 1 and ledger.planner.replan_due
    clock.t = last + 20.0
    ledger.reap()
    assert memo.searches + memo.hits > 1 and ledger.planner.merged_search_at() is None
    assert ledger.status()["events"][-1]["kind"] == "replan_pending"  # the newcomer's plan waits for a checkpoint


def test_replan_every_s_must_not_be_negative():
    from gptjt_core.config import ConfigError, SchedulerConfig
    with pytest.raises(ConfigError, match="replan_every_s"):
        SchedulerConfig(replan_every_s=-1.0)
    with pytest.raises(ConfigError, match="replan_every_running_s"):
        SchedulerConfig(replan_every_running_s=-1.0)


def _device_gb(tflops: float, gb: float) -> dict:
    return {**device(tflops), "memory_bytes": int(gb * 1e9)}


def test_a_stage_left_empty_between_searches_takes_only_a_worker_that_fits_the_whole_stage(tmp_path):
    from coordinator.cost_model import MEMORY_HEADROOM, memory_needed_gb
    from coordinator.scheduler import workload
    ledger = make_ledger(tmp_path, replan_every_s=60.0)
    work = workload(ledger.run)
    one_layer, stage_1 = memory_needed_gb(TINY, work, 1, 2), memory_needed_gb(TINY, work, 2, 4)
    assert one_layer < stage_1  # the last stage holds the head as well
    between = (one_layer + stage_1) / 2 / MEMORY_HEADROOM  # one layer fits, the stage does not
    a = ledger.join("a", "h:0", _device_gb(0.01, 24))["id"]
    assert ledger.assignment(a)["stage"] == 0 and ledger.planner.plan[1].end == 4
    small = ledger.join("small", "h:1", _device_gb(0.02, between))["id"]  # merged: fill_vacancies(check_fit)
    assert ledger.planner.replan_due and ledger.assignment(small)["stage"] == -1
    big = ledger.join("big", "h:2", _device_gb(0.01, 24))["id"]
    assert ledger.assignment(big)["stage"] == 1 and ledger.assignment(small)["stage"] == -1


def test_a_merged_replan_that_fails_is_undone_recorded_and_not_retried_on_every_pass(tmp_path, monkeypatch):
    ledger = make_ledger(tmp_path, replan_every_s=5.0)
    ledger.join("w0", "h:0", device(0.01))
    ledger.join("w1", "h:1", device(0.02))
    assert ledger.planner.replan_due
    plan_before, calls = list(ledger.planner.plan), []

    def broken(*args, **kwargs):  # fault injection: the search itself raises
        calls.append(1)
        ledger.planner.save(ledger.planner.plan[:1])  # ... after changing the plan it holds
        raise RuntimeError("search blew up")
    monkeypatch.setattr("coordinator.ledger.planning.decide", broken)
    ledger.db.clock.t += 5.0
    ledger.reap()  # does not raise: the reaper's other duties go on
    assert calls == [1] and ledger.planner.replan_due == ""
    assert ledger.planner.plan == plan_before and ledger.status()["plan"]["ranges"] == [[0, 2], [2, 4]]
    failed = [e for e in ledger.status()["events"] if e["kind"] == "replan_failed"]
    assert len(failed) == 1 and "search blew up" in failed[0]["detail"]
    ledger.db.clock.t += 5.0
    ledger.reap()
    assert calls == [1]  # not retried on every pass


def test_the_merge_window_is_last_to_last_plus_every_and_a_clock_stepped_back_does_not_defer(tmp_path):
    ledger = make_ledger(tmp_path, replan_every_s=0.1)
    ledger.join("w0", "h:0", device(0.01))
    ledger.db.clock.t = 0.7  # 0.7 - 0.6 < 0.1 in floats, though 0.6 + 0.1 = 0.7 is where the window ends
    ledger.db.set_meta("last_search_at", 0.6)
    assert not ledger.planner._searched_recently()
    ledger.db.clock.t = 0.65
    assert ledger.planner._searched_recently()
    ledger.db.clock.t = 0.5  # the host's clock stepped back past the last search
    assert not ledger.planner._searched_recently()
    ledger.run.scheduler.replan_every_s = 0.0
    ledger.db.clock.t = 0.6
    assert not ledger.planner._searched_recently()


def test_a_search_the_backstop_cut_short_is_counted_and_told_to_the_operator(tmp_path):
    # search_budget_s = 0: the wall-clock backstop has passed before the first candidate is scored
    def two_workers_join(ledger):
        for i, rate in enumerate((0.01, 0.02)):
            ledger.join(f"w{i}", f"h:{i}", device(rate))
        return ledger

    cut = two_workers_join(make_ledger(tmp_path / "cut", search_budget_s=0.0))
    assert cut.planner.memo.backstop_hits >= 1 and cut.planner.memo.backstop_hits <= cut.planner.memo.searches
    told = [e for e in cut.status()["events"] if e["kind"] == "plan_search_cut_short"]
    assert len(told) == cut.planner.memo.backstop_hits and "search_budget_s" in told[0]["detail"]
    calm = two_workers_join(make_ledger(tmp_path / "calm"))  # the default backstop never binds on two workers
    assert calm.planner.memo.searches >= 1 and calm.planner.memo.backstop_hits == 0
    assert not [e for e in calm.status()["events"] if e["kind"] == "plan_search_cut_short"]
