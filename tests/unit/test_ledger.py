"""The coordinator's ledger, driven directly with an injected clock (no processes), on both backends:
a SQLite file and a PostgreSQL database (tests/postgres_server.py), the same rules on each."""

from __future__ import annotations

import json
import math

import pytest

from coordinator.scheduler import plan_stages
import coordinator.ledger.history
from coordinator.ledger import APPLYING, LedgerError, RunLedger, create_token_in
from coordinator.ledger import count_tickets as _count_tickets
from tests.conftest import at, small_run


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


pytestmark = pytest.mark.usefixtures("both_ledger_backends")


def make(tmp_path, stages: int = 2, clock=None, steps: int = 2):
    run = small_run(steps=steps, global_batch=4, micro_batch=2)
    run.pipeline.num_stages = stages
    run.coordinator.heartbeat_timeout_s = 10.0
    return RunLedger(at(tmp_path), run, plan_stages(4, stages), clock or Clock())


def ready_swarm(ledger: RunLedger, n: int) -> list[str]:
    ids = [ledger.join(f"w{i}", f"127.0.0.1:{9000 + i}", {})["id"] for i in range(n)]
    for worker_id in ids:
        ledger.heartbeat(worker_id, "ready", {}, ledger.restore_epoch, ledger.step)
    return ids


def finish_step(ledger: RunLedger, ids: list[str]) -> None:
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        assert ledger.commit(ids[0], t.id, t.attempt, 1.0, 128) == "committed"
    for worker_id in ids:
        assert ledger.report(worker_id, ledger.step, ledger.attempt, "contribution", 4.0, 2)
    assert ledger.phase == APPLYING
    assert ledger.global_grad_norm() == pytest.approx((4.0 * len(ids)) ** 0.5)
    for worker_id in ids:
        assert ledger.report(worker_id, ledger.step, ledger.attempt, "applied")


def test_tokens_are_hashed_and_checked(tmp_path):
    token = create_token_in(at(tmp_path))
    ledger = make(tmp_path)
    assert ledger.check_token(token)
    assert not ledger.check_token("") and not ledger.check_token(token + "x")
    stored = [tuple(r) for r in ledger.db.execute("SELECT * FROM tokens")]
    assert stored and token not in repr(stored)
    if not ledger.db.postgres:  # the whole file, not only the table
        assert token not in at(tmp_path).read_bytes().decode("latin-1")


def test_stages_fill_in_join_order_then_standby(tmp_path):
    ledger = make(tmp_path)
    a, b, c = (ledger.join(n, f"h:{i}", {}) for i, n in enumerate("abc"))
    assert (a["stage"], b["stage"], c["stage"]) == (0, 1, -1)
    assert ledger.assignment(a["id"])["next_address"] == "h:1"
    assert ledger.phase == "waiting"
    ledger.heartbeat(a["id"], "ready", {}, 0, ledger.step)
    assert ledger.phase == "waiting"  # stage 1 still loading
    ledger.heartbeat(b["id"], "ready", {}, -1, ledger.step)
    assert ledger.phase == "waiting"  # stage 1 has not loaded the current restore epoch
    ledger.heartbeat(b["id"], "ready", {}, 0, ledger.step)
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
    assert not ledger.report(ids[0], 0, 0, "applied")  # cannot apply before the norm is known
    ledger.report(ids[0], 0, 0, "contribution", 9.0, 2)
    ledger.report(ids[1], 0, 0, "contribution", 16.0, 2)
    assert ledger.phase == APPLYING and ledger.global_grad_norm() == 5.0
    ledger.report(ids[0], 0, 0, "applied")
    ledger.report(ids[1], 0, 0, "applied")
    assert ledger.step == 1 and ledger.phase == "open"
    status = ledger.status()
    assert status["history"][0]["loss"] == 5.0 and status["history"][0]["tokens"] == 256
    finish_step(ledger, ids)
    assert ledger.phase == "done" and ledger.exactly_once_violations() == []


def test_a_long_run_status_carries_recent_steps_and_a_bounded_curve(tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator.ledger.history, "HISTORY_STEPS", 3)
    monkeypatch.setattr(coordinator.ledger.history, "LOSS_CURVE_POINTS", 4)
    ledger = make(tmp_path, steps=10)
    ids = ready_swarm(ledger, 2)
    for step in range(10):
        tickets, _ = ledger.lease(ids[0], 100)
        for t in tickets:
            ledger.commit(ids[0], t.id, t.attempt, float(step), 128)  # step loss: 2 x step
        for worker_id in ids:
            ledger.report(worker_id, step, 0, "contribution", 1.0, 2)
        for worker_id in ids:
            ledger.report(worker_id, step, 0, "applied")
    status = ledger.status()
    assert [h["step"] for h in status["history"]] == [7, 8, 9] and status["tokens"] == 10 * 256
    # 10 steps in buckets of ceil(10 / 4) = 3: steps 0-2, 3-5, 6-8, 9, each at its last step
    assert [(p["step"], p["loss"]) for p in status["loss_curve"]] == [(2, 2.0), (5, 8.0), (8, 14.0), (9, 18.0)]
    assert status["tickets"]["committed"] == 20 and status["tickets"]["exactly_once_violations"] == []


def test_kept_verdicts_and_counts_agree_with_a_fresh_look(tmp_path):
    ledger = make(tmp_path, steps=5)
    ids = ready_swarm(ledger, 2)
    finish_step(ledger, ids)
    counts = ledger.ticket_counts()  # now kept for step 0
    # A bug that commits a micro-batch twice in the open step: the step's verdict records it.
    tickets, _ = ledger.lease(ids[0], 100)
    ledger.db.execute("INSERT INTO tickets(step, attempt, idx, shard, offset, state) VALUES(1, 7, 0, 0, 0, "
                      "'committed')")
    for t in tickets:
        ledger.commit(ids[0], t.id, t.attempt, 1.0, 128)
    for worker_id in ids:
        ledger.report(worker_id, 1, 0, "contribution", 4.0, 2)
    for worker_id in ids:
        ledger.report(worker_id, 1, 0, "applied")
    assert ledger.exactly_once_violations() == ledger.audit_exactly_once() == [
        "step 1: committed micro-batches {0: 2, 1: 1} (expected each of 2 once)"]
    assert ledger.exactly_once_counts() == {"lost": 0, "double": 1}
    assert ledger.ticket_counts() == _count_tickets(ledger.db, 0, None) != counts
    # Reopened (a coordinator restart), the ledger agrees with itself.
    ledger.db.close()
    again = make(tmp_path, steps=5)
    assert again.ticket_counts() == _count_tickets(again.db, 0, None)
    assert again.exactly_once_violations() == again.audit_exactly_once()


def test_silent_worker_is_reaped_its_step_restarted_and_stale_work_refused(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock)
    ids = ready_swarm(ledger, 2)
    spare = ledger.join("spare", "h:spare", {})["id"]
    tickets, _ = ledger.lease(ids[0], 100)
    ledger.commit(ids[0], tickets[0].id, 0, 1.0, 128)
    clock.t += 5
    ledger.heartbeat(ids[0], "ready", {}, 0, ledger.step)
    ledger.heartbeat(spare, "standby", {})
    clock.t += 6  # ids[1] silent for 11 s > 10 s
    assert ledger.reap() == [ids[1]]
    assert ledger.attempt == 1 and ledger.restore_epoch == 1
    assert ledger.commit(ids[0], tickets[1].id, 0, 1.0, 128) == "stale"
    assert ledger.assignment(spare)["stage"] == 1  # the standby took the vacant stage
    assert ledger.phase == "waiting"
    ledger.heartbeat(spare, "ready", {}, 1, ledger.step)
    assert ledger.phase == "waiting"  # the survivor has not acknowledged the new epoch yet
    ledger.heartbeat(ids[0], "ready", {}, 1, ledger.step)
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
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, ledger.step)
    for _ in range(3):
        finish_step(ledger, [ids[0], spare])
    assert ledger.phase == "done" and ledger.exactly_once_violations() == ledger.audit_exactly_once() == []
    assert ledger.ticket_counts()["rolled_back"] == 4  # step 2 (committed) and step 3 (issued)
    assert ledger.ticket_counts() == _count_tickets(ledger.db, 0, None)


def test_ticket_counts_kept_across_a_rollback_stay_true(tmp_path):
    ledger = make(tmp_path, steps=6)
    ids = ready_swarm(ledger, 2)
    for _ in range(2):
        finish_step(ledger, ids)
    for spec in ledger.plan:
        ledger.record_checkpoint(1, spec, f"step-1/{spec.start}")
    finish_step(ledger, ids)
    assert ledger.ticket_counts()["rolled_back"] == 0  # steps 0-2's counts are kept from here
    spare = ledger.join("spare", "h:s", {})["id"]
    ledger.leave(ids[1])  # back to step 1: steps 1 and 2 are rolled back
    for w in (ids[0], spare):
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, ledger.step)
    for _ in range(3):  # past step 3 again before anyone asks
        finish_step(ledger, [ids[0], spare])
    assert ledger.step == 4
    assert ledger.ticket_counts() == _count_tickets(ledger.db, 0, None)
    assert ledger.ticket_counts()["rolled_back"] == 6  # steps 1 and 2 (committed), step 3 (issued)


def test_drained_stage_saved_at_the_boundary_needs_no_rollback(tmp_path):
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    finish_step(ledger, ids)
    ledger.record_checkpoint(1, ledger.plan[1], "step-1/stage-1")  # what a draining worker uploads
    ledger.leave(ids[1])
    state = ledger.run_state(ids[0])
    assert (state["step"], state["restore_step"], state["restore_from_store"]) == (1, 1, True)
    assert "rolled_back" not in [e["kind"] for e in ledger.status()["events"]]


def test_a_complete_step_saved_again_is_announced_complete_once(tmp_path):
    """A stage's last replica leaving saves the open step's state, which the last checkpoint may
    already hold: the file replaces its stage's, and the operator sees one checkpoint_complete."""
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    finish_step(ledger, ids)
    for spec in ledger.plan:
        ledger.record_checkpoint(1, spec, f"step-1/{spec.start}")
    ledger.record_checkpoint(1, ledger.plan[0], "step-1/again")  # the draining stage-0 worker's upload
    ledger.leave(ids[0])
    events = [e for e in ledger.status()["events"] if e["kind"] == "checkpoint_complete"]
    assert [e["detail"] for e in events] == ["step 1: every stage is in the store"]
    assert "step-1/again" in [r["path"] for r in ledger.checkpoints.stored(1)]
    assert ledger.status()["checkpoints"]["latest_complete"] == 1


def test_old_checkpoints_are_forgotten_once_newer_ones_are_complete(tmp_path):
    ledger = make(tmp_path, steps=6)
    ledger.run.coordinator.keep_checkpoints = 2
    ids = ready_swarm(ledger, 2)
    forgotten = []
    for step in (1, 2, 3, 4):
        finish_step(ledger, ids)
        for spec in ledger.plan:
            forgotten.append((step, ledger.record_checkpoint(step, spec, f"step-{step}/{spec.start}")))
    ledger.record_checkpoint(5, ledger.plan[0], "step-5/0")  # a step still being saved
    # Step 1 goes once step 3 is complete (not when only its first stage is in), step 2 with 4.
    assert forgotten == [(1, []), (1, []), (2, []), (2, []), (3, []), (3, [1]), (4, []), (4, [2])]
    cps = ledger.status()["checkpoints"]
    assert (cps["steps"], cps["latest_complete"]) == ([3, 4, 5], 4)
    assert [e["kind"] for e in ledger.status()["events"]].count("checkpoints_pruned") == 2


def test_the_step_being_restored_is_never_forgotten(tmp_path):
    ledger = make(tmp_path, steps=6)
    ledger.run.coordinator.keep_checkpoints = 1
    ids = ready_swarm(ledger, 2)
    for _ in range(3):
        finish_step(ledger, ids)
    for spec in ledger.plan:
        ledger.record_checkpoint(2, spec, f"step-2/{spec.start}")
    ledger.leave(ids[1])  # stage 1 is lost at step 3: every stage reloads step 2 from the store
    assert ledger.run_state(ids[0])["restore_step"] == 2 and ledger.phase == "waiting"
    # A late upload completes step 3 while the run restores step 2 (keep 1 would drop step 2).
    assert [ledger.record_checkpoint(3, spec, f"step-3/{spec.start}") for spec in ledger.plan] == [[], []]
    assert ledger.status()["checkpoints"]["steps"] == [2, 3]
    spare = ledger.join("spare", "h:s", {})["id"]
    ledger.heartbeat(spare, "ready", {}, ledger.restore_epoch, ledger.step)
    assert ledger.phase == "waiting"  # ids[0] has not loaded step 2 yet: still kept
    assert [ledger.record_checkpoint(4, spec, f"step-4/{spec.start}") for spec in ledger.plan] == [[], [3]]
    ledger.heartbeat(ids[0], "ready", {}, ledger.restore_epoch, ledger.step)
    assert ledger.phase == "open"  # every stage holds step 2 now: it may go
    assert [ledger.record_checkpoint(5, spec, f"step-5/{spec.start}") for spec in ledger.plan] == [[], [2, 4]]


def test_keep_checkpoints_must_not_be_negative():
    from gptjt_core.config import CoordinatorConfig, ConfigError

    with pytest.raises(ConfigError, match="keep_checkpoints"):
        CoordinatorConfig(keep_checkpoints=-1)


def test_a_new_run_ignores_an_old_store_unless_told_to_resume(tmp_path):
    run = small_run(steps=4)
    plan = plan_stages(4, 2)
    stored = [(3, spec, f"old/{i}") for i, spec in enumerate(plan)]
    fresh = RunLedger(at(tmp_path, "a.db"), run, plan, Clock(), stored=stored)
    assert fresh.step == 0 and fresh.status()["checkpoints"]["latest_complete"] is None
    assert "store_not_empty" in [e["kind"] for e in fresh.status()["events"]]
    run.coordinator.resume_from_store = True
    resumed = RunLedger(at(tmp_path, "b.db"), run, plan, Clock(), stored=stored)
    state = resumed.run_state("nobody")
    assert (state["step"], state["restore_step"], state["restore_from_store"]) == (3, 3, True)


# -- replicas ---------------------------------------------------------------------------
def make_replicated(tmp_path, clock=None, steps: int = 3):
    run = small_run(steps=steps, global_batch=8, micro_batch=2)
    run.pipeline.num_stages = 2
    run.pipeline.replicas_per_stage = 2
    run.coordinator.heartbeat_timeout_s = 10.0
    return RunLedger(at(tmp_path), run, plan_stages(4, 2), clock or Clock())


def commit_all(ledger: RunLedger, stage0: list[str]) -> int:
    """Lease and commit every ticket of the open step, one at a time round the stage-0 replicas."""
    done = 0
    for w in stage0 * 4:
        for t in ledger.lease(w, 1)[0]:
            assert ledger.commit(w, t.id, t.attempt, 1.0, 128) == "committed"
            done += 1
    return done


def run_replicated_step(ledger: RunLedger, by_stage: dict[int, list[str]], norms: dict[str, float] | None = None,
                        digests: dict[str, str] | None = None) -> None:
    """Lease/commit every ticket through stage 0's replicas, then contributions, sums, updates."""
    step, attempt = ledger.step, ledger.attempt
    assert commit_all(ledger, by_stage[0]) == 4 and ledger.phase == "accumulated"
    members = [w for ids in by_stage.values() for w in ids]
    for w in members:
        assert ledger.report(w, step, attempt, "contribution", (norms or {}).get(w, 4.0), 2)
    assert ledger.phase == "averaging"
    for w in members:
        assert ledger.report(w, step, attempt, "averaged", 16.0, group_weight=4.0)
    assert ledger.phase == APPLYING and ledger.global_grad_norm() == pytest.approx(32.0 ** 0.5)
    for w in members:
        assert ledger.report(w, step, attempt, "applied", digest=(digests or {}).get(w, "same"))


def replicated_swarm(ledger: RunLedger) -> dict[int, list[str]]:
    ids = ready_swarm(ledger, 4)
    by_stage: dict[int, list[str]] = {}
    for w in ids:
        by_stage.setdefault(ledger.assignment(w)["stage"], []).append(w)
    return by_stage


def test_stage0_replicas_lease_their_own_shards_first_and_then_any(tmp_path):
    """4 tickets over shards 0-3, 2 stage-0 replicas (in id order, rank r owns shards with shard %
    2 == r): each takes
    its own shard's tickets first (so it reads only that shard's files), then the other's, so
    no ticket waits for its owner; every ticket once."""
    ledger = make_replicated(tmp_path)
    a, b = sorted(replicated_swarm(ledger)[0])
    held_by_b = ledger.lease(b, 2)[0]
    assert [t.shard % 2 for t in held_by_b] == [1, 1]
    got = ledger.lease(a, 3)[0]
    assert [t.shard % 2 for t in got] == [0, 0]  # its own two; b's are leased already
    for t in got:
        assert ledger.commit(a, t.id, t.attempt, 1.0, 128) == "committed"
    assert ledger.release(b, [t.id for t in held_by_b]) == 2
    assert [t.shard % 2 for t in ledger.lease(a, 4)[0]] == [1, 1]  # b let go of them: a takes them


def test_replicas_fill_stages_evenly_and_route_to_each_other(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    assert {s: len(ids) for s, ids in by_stage.items()} == {0: 2, 1: 2}
    a = ledger.assignment(by_stage[0][0])
    assert a["member"] and sorted(a["next_addresses"]) == sorted(
        w["address"] for w in ledger.status()["workers"] if w["stage"] == 1)
    assert a["checkpoint_writer"] == (by_stage[0][0] == min(by_stage[0]))
    assert ledger.join("fifth", "h:5", {})["stage"] == -1  # both stages are full: standby
    run_replicated_step(ledger, by_stage)
    history = ledger.status()["history"]
    assert history[0]["stages"]["1"]["summed_micro_batches"] == 4.0
    assert sorted(history[0]["stages"]["0"]["replicas"]) == sorted(by_stage[0])


def test_poisoned_contribution_is_refused_and_named(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    bad = by_stage[1][1]
    run_replicated_step(ledger, by_stage)  # step 0 sets each stage's reference norm
    step = ledger.step
    commit_all(ledger, by_stage[0])
    for w in [*by_stage[0], *by_stage[1]]:
        ledger.report(w, step, 0, "contribution", 4.0e6 if w == bad else 4.0, 2)
    assert ledger.phase == "averaging"
    assert ledger.assignment(bad)["contributors"] == [by_stage[1][0]]
    assert sorted(ledger.assignment(by_stage[0][0])["contributors"]) == sorted(by_stage[0])
    poisoned = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "poisoned_update"]
    assert len(poisoned) == 1 and bad in poisoned[0] and "stage 1" in poisoned[0]


def test_nan_contribution_is_refused_even_without_history(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    commit_all(ledger, by_stage[0])
    for w in [*by_stage[0], *by_stage[1]]:
        ledger.report(w, 0, 0, "contribution", float("nan") if w == by_stage[0][1] else 4.0, 2)
    assert ledger.assignment(by_stage[0][0])["contributors"] == [by_stage[0][0]]


def test_a_dead_replica_leaves_its_stage_running_without_rollback(tmp_path):
    clock = Clock()
    ledger = make_replicated(tmp_path, clock=clock)
    by_stage = replicated_swarm(ledger)
    victim, survivor = by_stage[0]
    tickets, _ = ledger.lease(victim, 2)
    ledger.commit(victim, tickets[0].id, 0, 1.0, 128)
    ledger.declare_dead(victim, "connection reset")
    assert ledger.attempt == 0 and ledger.restore_epoch == 0 and ledger.phase == "open"
    kinds = [e["kind"] for e in ledger.status()["events"]]
    assert "replica_lost" in kinds and "rolled_back" not in kinds and "step_restarted" not in kinds
    # the victim's second ticket goes back to the pool, the committed one stays counted
    rest, _ = ledger.lease(survivor, 10)
    assert tickets[1].id in [t.id for t in rest] and len(rest) == 3
    for t in rest:
        ledger.commit(survivor, t.id, t.attempt, 1.0, 128)
    assert ledger.phase == "accumulated"
    members = [survivor, *by_stage[1]]
    for w in members:
        ledger.report(w, 0, 0, "contribution", 4.0, 2)
    for w in members:
        ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    for w in members:
        ledger.report(w, 0, 0, "applied", digest="d")
    assert ledger.step == 1 and ledger.exactly_once_violations() == []


def test_replicas_that_sum_different_gradients_rerun_the_step(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    commit_all(ledger, by_stage[0])
    members = [*by_stage[0], *by_stage[1]]
    for w in members:
        ledger.report(w, 0, 0, "contribution", 4.0, 2)
    for w in members:
        ledger.report(w, 0, 0, "averaged", 16.0, group_weight=2.0 if w == by_stage[1][0] else 4.0)
    assert ledger.attempt == 1 and ledger.phase == "open" and ledger.step == 0
    assert "step_restarted" in [e["kind"] for e in ledger.status()["events"]]


def test_a_joiner_copies_a_replica_and_takes_part_from_the_next_step(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    ledger.declare_dead(by_stage[1][1], "gone")
    joiner = ledger.join("joiner", "h:j", {})["id"]
    a = ledger.assignment(joiner)
    assert a["stage"] == 1 and not a["member"]
    assert a["peer_addresses"] == [w["address"] for w in ledger.status()["workers"] if w["id"] == by_stage[1][0]]
    assert (a["attested_position"], a["attested_digests"]) == (0, [])  # no step closed: nothing to check a copy by
    commit_all(ledger, by_stage[0])
    assert ledger.phase == "accumulated"
    ledger.heartbeat(joiner, "ready", {}, ledger.restore_epoch, 0)  # copied step-0 state, too late to join
    assert not ledger.report(joiner, 0, 0, "contribution", 1.0, 1)
    members = [*by_stage[0], by_stage[1][0]]
    for kind, extra in (("contribution", {"grad_norm_sq": 4.0, "micro_batches": 2}),
                        ("averaged", {"grad_norm_sq": 16.0, "group_weight": 4.0}), ("applied", {"digest": "d"})):
        for w in members:
            assert ledger.report(w, 0, 0, kind, **extra)
    assert ledger.step == 1 and joiner not in ledger.status()["stages"][1]["members"]  # its copy is stale
    # the copy it fetches again must be the state the stage's members reported after step 0
    a = ledger.assignment(joiner)
    assert (a["attested_position"], a["attested_digests"]) == (1, ["d"])
    assert ledger.status()["history"][0]["stages"]["1"]["layers"] == [a["start_layer"], a["end_layer"]]
    assert ledger.assignment(by_stage[1][0])["attested_digests"] == []  # a holder copies nothing
    # digests of another layer range (a re-plan since) or of none recorded (an older ledger) check nothing
    detail = json.loads(ledger.db.execute("SELECT detail FROM steps WHERE step=0").fetchone()[0])
    for layers in ([9, 10], None):
        detail["1"]["layers"] = layers
        ledger.db.execute("UPDATE steps SET detail=? WHERE step=0", (json.dumps(detail),))
        ledger.views._attested = ledger.views._facts = None  # read once per closed step: read them again
        assert ledger.assignment(joiner)["attested_digests"] == []
    ledger.heartbeat(joiner, "ready", {}, ledger.restore_epoch, 1)  # fetched again: joins the open step
    assert ledger.assignment(joiner)["member"]
    assert ledger.assignment(joiner)["attested_digests"] == []
    run_replicated_step(ledger, {0: by_stage[0], 1: [by_stage[1][0], joiner]})
    assert ledger.status()["history"][1]["stages"]["1"]["digests"][joiner] == "same"


def test_averaging_that_never_finishes_restarts_the_step(tmp_path):
    clock = Clock()
    ledger = make_replicated(tmp_path, clock=clock)
    by_stage = replicated_swarm(ledger)
    commit_all(ledger, by_stage[0])
    for w in [*by_stage[0], *by_stage[1]]:
        ledger.report(w, 0, 0, "contribution", 4.0, 2)
    clock.t += 3 * ledger.run.averaging.timeout_s + 1
    for w in [*by_stage[0], *by_stage[1]]:
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 0)
    ledger.reap()
    assert ledger.attempt == 1 and ledger.phase == "open"


def test_a_stage_that_loses_every_replica_takes_a_surplus_one_from_another(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    run_replicated_step(ledger, by_stage)
    for w in by_stage[1]:
        ledger.declare_dead(w, "gone")
    moved = [w for w in by_stage[0] if ledger.assignment(w)["stage"] == 1]
    assert len(moved) == 1 and ledger.assignment(by_stage[0][0])["stage"] == 0
    assert ledger.phase == "waiting" and ledger.restore_epoch == 1
    assert "replica_moved" in [e["kind"] for e in ledger.status()["events"]]
    for w in by_stage[0]:  # both reload the step-1 state (from the store, or roll back)
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, ledger.step)
    assert ledger.phase == "open"


def test_last_member_lost_mid_step_hands_the_step_to_a_replica_that_joined_during_it(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    first, second = by_stage[1]
    ledger.declare_dead(second, "gone")
    joiner = ledger.join("joiner", "h:j", {})["id"]
    commit_all(ledger, by_stage[0])
    assert ledger.phase == "accumulated"
    ledger.heartbeat(joiner, "ready", {}, ledger.restore_epoch, ledger.step)  # copied, too late to join
    assert not ledger.assignment(joiner)["member"]
    ledger.declare_dead(first, "gone")  # the stage's last member
    assert ledger.attempt == 1 and ledger.phase == "open" and ledger.restore_epoch == 0  # no rollback
    assert ledger.assignment(joiner)["member"]
    run_replicated_step(ledger, {0: by_stage[0], 1: [joiner]})
    assert ledger.step == 1 and ledger.exactly_once_violations() == []


def test_last_member_lost_while_applying_restores_the_stage(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    first, second = by_stage[1]
    ledger.declare_dead(second, "gone")
    joiner = ledger.join("joiner", "h:j", {})["id"]
    commit_all(ledger, by_stage[0])
    members = [*by_stage[0], first]
    for w in members:
        ledger.report(w, 0, 0, "contribution", 4.0, 2)
    for w in members:
        ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    assert ledger.phase == APPLYING
    ledger.heartbeat(joiner, "ready", {}, ledger.restore_epoch, 0)  # holds step 0, not the update
    ledger.declare_dead(first, "gone")
    assert ledger.restore_epoch == 1 and ledger.phase == "waiting"  # the stage is restored, no stall
    assert "stage_vacant" in [e["kind"] for e in ledger.status()["events"]]


def local_steps_swarm(tmp_path, outer_every: int) -> tuple[RunLedger, dict[int, list[str]], list[str]]:
    """2 stages x 2 replicas in averaging.mode local-steps: the ledger, workers by stage, all members."""
    run = small_run(steps=3, global_batch=8, micro_batch=2)
    run.pipeline.num_stages, run.pipeline.replicas_per_stage = 2, 2
    run.averaging.mode, run.averaging.outer_every = "local-steps", outer_every
    ledger = RunLedger(at(tmp_path), run, plan_stages(4, 2), Clock())
    by_stage = replicated_swarm(ledger)
    return ledger, by_stage, [w for ids in by_stage.values() for w in ids]


def test_local_steps_skip_averaging_except_at_outer_steps(tmp_path):
    ledger, by_stage, members = local_steps_swarm(tmp_path, outer_every=2)
    for step in range(3):
        assert commit_all(ledger, by_stage[0]) == 4
        # replica shares 1 and 3 of the 4 micro-batches, gradient norm^2 1 and 9
        for i, w in enumerate(members):
            assert ledger.report(w, step, 0, "contribution", 1.0 if i % 2 == 0 else 9.0, 1 if i % 2 == 0 else 3)
        # clip norm: per stage the mean of (norm^2 x (4 / share)^2) = (16 + 16) / 2, two stages
        assert ledger.global_grad_norm() == pytest.approx(32.0 ** 0.5)
        if step == 2:  # the outer step
            assert ledger.phase == "averaging"
            for w in members:
                assert ledger.report(w, step, 0, "averaged", 0.5, group_weight=2.0)
            assert ledger.global_grad_norm() == pytest.approx(32.0 ** 0.5)  # the pseudo-gradient's is not it
        assert ledger.phase == APPLYING
        for w in members:
            assert ledger.report(w, step, 0, "applied", digest="anchor")
    history = ledger.status()["history"]
    assert [h["stages"]["0"]["summed_micro_batches"] for h in history] == [None, None, 2.0]


def test_a_skipped_outer_step_still_averages(tmp_path):
    ledger, by_stage, members = local_steps_swarm(tmp_path, outer_every=1)
    for step in range(2):
        assert commit_all(ledger, by_stage[0]) == 4
        # step 1 (an outer step): every stage-0 replica's new gradient is NaN
        for w in members:
            bad = step == 1 and w in by_stage[0]
            assert ledger.report(w, step, 0, "contribution", float("nan") if bad else 4.0, 2)
        if step == 1:
            assert "step_skipped" in ledger.status()["event_counts"]
            assert ledger.phase == "averaging"  # the inner steps accepted before are still averaged
            for w in members:
                assert ledger.report(w, step, 0, "averaged", 0.5, group_weight=2.0)
            assert math.isnan(ledger.global_grad_norm())  # ... while this step's inner update is skipped
        assert ledger.phase == APPLYING
        for w in members:
            assert ledger.report(w, step, 0, "applied", digest="anchor")


def test_a_stage_that_kept_a_handed_back_micro_batch_twice_restarts_the_step(tmp_path):
    """A ticket handed back after its gradient was kept (the bench's liar: its commit was refused)
    is done again by a replica: the stage's replicas then sum one micro-batch too many, and only
    a new attempt, every partial sum dropped, counts each micro-batch once."""
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    commit_all(ledger, by_stage[0])
    total = ledger.run.train.micro_batches_per_step
    for stage, (a, b) in by_stage.items():
        extra = 1 if stage == 1 else 0
        assert ledger.report(a, 0, 0, "contribution", 4.0, total // 2 + extra) is not None
        ledger.report(b, 0, 0, "contribution", 4.0, total - total // 2)
    assert (ledger.step, ledger.attempt) == (0, 1) and ledger.phase in ("waiting", "open")
    (why,) = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "step_restarted"]
    assert f"stage 1's replicas kept the gradients of {total + 1} micro-batches for the step's {total}" in why
    # one replica alone can keep more than the step has (a chaos soak's stage-1 replica kept 5 of 4,
    # and its report was refused as malformed, which stopped the worker): the step restarts again
    commit_all(ledger, by_stage[0])
    for stage, (a, b) in by_stage.items():
        ledger.report(a, 0, 1, "contribution", 4.0, total + 1 if stage == 1 else total // 2)
        ledger.report(b, 0, 1, "contribution", 4.0, 0 if stage == 1 else total - total // 2)
    assert (ledger.step, ledger.attempt) == (0, 2)


def test_a_standby_watch_key_moves_with_what_a_standby_acts_on_not_with_a_step(tmp_path):
    """AssignmentView.standby_key: standby Watch streams wake only when it moves
    (coordinator/watch_streams.py), so a closed step must leave it and a pause, a drain or a
    placement must move it."""
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    spare = ledger.join("spare", "127.0.0.1:9100", {})["id"]
    assert ledger.run_state(spare)["assignment"]["stage"] == -1
    key, version, step = ledger.views.standby_key(), ledger.version, ledger.step
    finish_step(ledger, ids)
    assert ledger.step == step + 1 and ledger.version != version
    assert ledger.views.standby_key() == key
    ledger.set_paused(True)
    assert ledger.views.standby_key() != key
    key = ledger.views.standby_key()
    ledger.request_drain(spare)
    assert ledger.views.standby_key() != key
    key = ledger.views.standby_key()
    ledger.leave(ids[1])  # the spare takes the stage it held
    assert ledger.run_state(spare)["assignment"]["stage"] >= 0
    assert ledger.views.standby_key() != key


def test_a_placed_workers_own_state_moves_the_plan_version_but_wakes_no_standby(tmp_path):
    """A placed worker that reports another loaded epoch, position or state (reloading its stage,
    then ready again) bumps plan_version for its peers; a standby acts on none of it, so
    standby_key stays and the standbys' Watch streams sleep on (at 10,000 workers each such
    wake was ~10,000 reads)."""
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    spare = ledger.join("spare", "127.0.0.1:9100", {})["id"]
    finish_step(ledger, ids)
    key, plan_version = ledger.views.standby_key(), ledger.run_state(spare)["plan_version"]
    ledger.heartbeat(ids[0], "loading", {}, -1, -1)
    ledger.heartbeat(ids[0], "ready", {}, ledger.restore_epoch, ledger.step)
    assert ledger.run_state(spare)["plan_version"] == plan_version + 2  # its peers hear of each
    assert ledger.run_state(spare)["assignment"]["stage"] == -1
    assert ledger.views.standby_key() == key


def test_a_standbys_view_of_its_run_state_ignores_the_steps_progress_not_a_drain(tmp_path):
    """standby_view: what a Watch stream compares between two standby states before sending the
    second (coordinator/watch_streams.py); a closed step moves the RunState, not the view."""
    from coordinator.ledger import standby_view

    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    spare = ledger.join("spare", "127.0.0.1:9100", {})["id"]
    before = ledger.run_state(spare)
    finish_step(ledger, ids)
    after = ledger.run_state(spare)
    assert after != before and after["step"] == before["step"] + 1
    assert standby_view(after) == standby_view(before)
    ledger.request_drain(spare)
    assert standby_view(ledger.run_state(spare)) != standby_view(after)
