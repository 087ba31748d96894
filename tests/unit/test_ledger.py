"""The coordinator's ledger, driven directly with an injected clock (real SQLite, no processes)."""

from __future__ import annotations

import pytest

from coordinator.scheduler import plan_stages
from coordinator.state import APPLYING, LedgerError, RunLedger, create_token_in
from tests.conftest import small_run


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, stages: int = 2, clock=None, steps: int = 2):
    run = small_run(steps=steps, global_batch=4, micro_batch=2)
    run.pipeline.num_stages = stages
    run.coordinator.heartbeat_timeout_s = 10.0
    return RunLedger(tmp_path / "run.db", run, plan_stages(4, stages), clock or Clock())


def ready_swarm(ledger: RunLedger, n: int) -> list[str]:
    ids = [ledger.join(f"w{i}", f"127.0.0.1:{9000 + i}", {})["id"] for i in range(n)]
    for worker_id in ids:
        ledger.heartbeat(worker_id, "ready", {}, ledger.restore_epoch)
    return ids


def finish_step(ledger: RunLedger, ids: list[str]) -> None:
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        assert ledger.commit(ids[0], t.id, t.attempt, 1.0, 128) == "committed"
    for worker_id in ids:
        assert ledger.report(worker_id, ledger.step, ledger.attempt, False, 4.0)
    assert ledger.phase == APPLYING
    assert ledger.global_grad_norm() == pytest.approx((4.0 * len(ids)) ** 0.5)
    for worker_id in ids:
        assert ledger.report(worker_id, ledger.step, ledger.attempt, True, 0.0)


def test_tokens_are_hashed_and_checked(tmp_path):
    token = create_token_in(tmp_path / "run.db")
    ledger = make(tmp_path)
    assert ledger.check_token(token)
    assert not ledger.check_token("") and not ledger.check_token(token + "x")
    assert token not in (tmp_path / "run.db").read_bytes().decode("latin-1")


def test_stages_fill_in_join_order_then_standby(tmp_path):
    ledger = make(tmp_path)
    a, b, c = (ledger.join(n, f"h:{i}", {}) for i, n in enumerate("abc"))
    assert (a["stage"], b["stage"], c["stage"]) == (0, 1, -1)
    assert ledger.assignment(a["id"])["next_address"] == "h:1"
    assert ledger.phase == "waiting"
    ledger.heartbeat(a["id"], "ready", {}, 0)
    assert ledger.phase == "waiting"  # stage 1 still loading
    ledger.heartbeat(b["id"], "ready", {}, -1)
    assert ledger.phase == "waiting"  # stage 1 has not loaded the current restore epoch
    ledger.heartbeat(b["id"], "ready", {}, 0)
    assert ledger.phase == "open"


def test_full_step_protocol_and_global_norm(tmp_path):
    ledger = make(tmp_path)
    ids = ready_swarm(ledger, 2)
    assert ledger.lease(ids[1], 4) == ([], "only stage 0 leases tickets; this worker holds stage 1")
    tickets, _ = ledger.lease(ids[0], 100)
    assert [(t.idx, t.shard, t.offset) for t in tickets] == [(0, 0, 0), (1, 1, 0)]
    for t in tickets:
        ledger.commit(ids[0], t.id, t.attempt, 2.5, 128)
    assert ledger.phase == "accumulated"
    assert not ledger.report(ids[0], 0, 0, True, 0.0)  # cannot apply before the norm is known
    ledger.report(ids[0], 0, 0, False, 9.0)
    ledger.report(ids[1], 0, 0, False, 16.0)
    assert ledger.phase == APPLYING and ledger.global_grad_norm() == 5.0
    ledger.report(ids[0], 0, 0, True, 0.0)
    ledger.report(ids[1], 0, 0, True, 0.0)
    assert ledger.step == 1 and ledger.phase == "open"
    status = ledger.status()
    assert status["history"][0]["loss"] == 5.0 and status["history"][0]["tokens"] == 256
    finish_step(ledger, ids)
    assert ledger.phase == "done" and ledger.exactly_once_violations() == []


def test_silent_worker_is_reaped_its_step_restarted_and_stale_work_refused(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock)
    ids = ready_swarm(ledger, 2)
    spare = ledger.join("spare", "h:spare", {})["id"]
    tickets, _ = ledger.lease(ids[0], 100)
    ledger.commit(ids[0], tickets[0].id, 0, 1.0, 128)
    clock.t += 5
    ledger.heartbeat(ids[0], "ready", {}, 0)
    ledger.heartbeat(spare, "standby", {})
    clock.t += 6  # ids[1] silent for 11 s > 10 s
    assert ledger.reap() == [ids[1]]
    assert ledger.attempt == 1 and ledger.restore_epoch == 1
    assert ledger.commit(ids[0], tickets[1].id, 0, 1.0, 128) == "stale"
    assert ledger.assignment(spare)["stage"] == 1  # the standby took the vacant stage
    assert ledger.phase == "waiting"
    ledger.heartbeat(spare, "ready", {}, 1)
    assert ledger.phase == "waiting"  # the survivor has not acknowledged the new epoch yet
    ledger.heartbeat(ids[0], "ready", {}, 1)
    assert ledger.phase == "open"
    finish_step(ledger, [ids[0], spare])
    finish_step(ledger, [ids[0], spare])
    assert ledger.exactly_once_violations() == []
    counts = ledger.ticket_counts()
    assert counts["aborted"] == 2 and counts["reissued"] == 2 and counts["committed"] == 4


def test_release_and_duplicate_commit(tmp_path):
    ledger = make(tmp_path)
    ids = ready_swarm(ledger, 2)
    tickets, _ = ledger.lease(ids[0], 1)
    assert ledger.release(ids[0], [tickets[0].id]) == 1
    again, _ = ledger.lease(ids[0], 1)
    assert again[0].id == tickets[0].id
    assert ledger.commit(ids[0], again[0].id, 0, 1.0, 1) == "committed"
    assert ledger.commit(ids[0], again[0].id, 0, 1.0, 1) == "already_committed"
    assert ledger.commit(ids[1], 12345, 0, 1.0, 1) == "not_leased"
    assert ledger.ticket_counts()["committed"] == 1


def test_restart_keeps_everything_and_grants_grace(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock)
    ids = ready_swarm(ledger, 2)
    tickets, _ = ledger.lease(ids[0], 1)
    ledger.commit(ids[0], tickets[0].id, 0, 1.0, 1)
    ledger.db.close()
    clock.t += 60  # long outage: without grace everyone would be reaped at once
    again = make(tmp_path, clock=clock)
    assert again.reap() == []
    assert again.ticket_counts()["committed"] == 1 and again.phase == "open"
    with pytest.raises(LedgerError, match="holds another run"):
        make(tmp_path, stages=1, clock=clock)


def test_leaving_stage_worker_between_steps_does_not_restart(tmp_path):
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    finish_step(ledger, ids)
    ledger.record_checkpoint(1, ledger.plan[1], "step-1/stage-1")
    ledger.leave(ids[1])
    assert ledger.attempt == 0 and ledger.phase == "waiting" and ledger.step == 1
    assert "step_restarted" not in [e["kind"] for e in ledger.status()["events"]]


def test_lost_stage_rolls_back_to_the_latest_complete_checkpoint(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock, steps=5)
    ids = ready_swarm(ledger, 2)
    finish_step(ledger, ids)
    finish_step(ledger, ids)
    for spec in ledger.plan:
        ledger.record_checkpoint(2, spec, f"step-2/{spec.start}")
    finish_step(ledger, ids)
    assert ledger.step == 3
    spare = ledger.join("spare", "h:s", {})["id"]
    ledger.leave(ids[1])  # without a checkpoint of its own at step 3
    state = ledger.run_state(spare)
    assert (state["step"], state["restore_step"], state["restore_from_store"]) == (2, 2, True)
    assert [h["step"] for h in ledger.status()["history"]] == [0, 1]
    assert "rolled_back" in [e["kind"] for e in ledger.status()["events"]]
    for w in (ids[0], spare):
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch)
    for _ in range(3):
        finish_step(ledger, [ids[0], spare])
    assert ledger.phase == "done" and ledger.exactly_once_violations() == []
    assert ledger.ticket_counts()["rolled_back"] == 4  # step 2 (committed) and step 3 (issued)


def test_drained_stage_saved_at_the_boundary_needs_no_rollback(tmp_path):
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    finish_step(ledger, ids)
    ledger.record_checkpoint(1, ledger.plan[1], "step-1/stage-1")  # what a draining worker uploads
    ledger.leave(ids[1])
    state = ledger.run_state(ids[0])
    assert (state["step"], state["restore_step"], state["restore_from_store"]) == (1, 1, True)
    assert "rolled_back" not in [e["kind"] for e in ledger.status()["events"]]


def test_a_new_run_ignores_an_old_store_unless_told_to_resume(tmp_path):
    run = small_run(steps=4)
    plan = plan_stages(4, 2)
    stored = [(3, spec, f"old/{i}") for i, spec in enumerate(plan)]
    fresh = RunLedger(tmp_path / "a.db", run, plan, Clock(), stored=stored)
    assert fresh.step == 0 and fresh.status()["checkpoints"]["latest_complete"] is None
    assert "store_not_empty" in [e["kind"] for e in fresh.status()["events"]]
    run.coordinator.resume_from_store = True
    resumed = RunLedger(tmp_path / "b.db", run, plan, Clock(), stored=stored)
    state = resumed.run_state("nobody")
    assert (state["step"], state["restore_step"], state["restore_from_store"]) == (3, 3, True)
