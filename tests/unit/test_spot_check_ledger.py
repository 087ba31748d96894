"""The ledger's spot checks (coordinator/ledger/spot_checks.py): drawn when a member's commitments
arrive, handed to another replica of its stage, judged against the claim with the tolerance of
both precisions, counted, and let go stale once the verifier's weights of the step are gone."""

from __future__ import annotations

import json
import random

import pytest
import torch

from coordinator.ledger import Submitted
from coordinator.ledger.spot_checks import SpotCheckBook, precision_of
from gptjt_core.commitment import Commitment
from gptjt_core.sketching import sketch_tensor
from tests.unit.test_commitment_ledger import digest
from coordinator.ledger import RunLedger
from coordinator.ledger.errors import OperatorError
from coordinator.scheduler import plan_stages
from gptjt_core.stage_spec import StageSpec
from tests.conftest import small_run
from tests.unit.test_ledger import Clock, commit_all, make, make_replicated, ready_swarm, replicated_swarm
from tests.conftest import at

pytestmark = pytest.mark.usefixtures("both_ledger_backends")  # SQLite and PostgreSQL

OUT = torch.linspace(-1.0, 1.0, 2 * 4 * 8).reshape(2, 4, 8)  # what an honest stage computed


def claim(ticket: int, stage: int, scale: float = 1.0) -> bytes:
    return Commitment(digest("in", ticket, stage), sketch_tensor(OUT * scale, key=digest("k", ticket)[:16])).to_bytes()


def contribute(ledger, by_stage, liar: str | None = None) -> dict[str, list[int]]:
    """Commit the open step's tickets and report every member's contribution with commitments
    (stage 1's replicas split the tickets as the routing would); returns tickets per worker."""
    step, attempt = ledger.step, ledger.attempt
    commit_all(ledger, by_stage[0])
    tickets = sorted(r[0] for r in ledger.db.execute("SELECT id FROM tickets WHERE step=?", (step,)))
    mine: dict[str, list[int]] = {}
    for stage, ids in by_stage.items():
        for i, w in enumerate(ids):
            mine[w] = tickets[i::len(ids)]
            commitments = [Submitted(t, attempt, claim(t, stage, 1.2 if w == liar else 1.0), None, None, None)
                           for t in mine[w]]
            assert ledger.report(w, step, attempt, "contribution", 4.0, len(mine[w]), commitments=commitments)
    return mine


def finish(ledger, by_stage) -> None:
    """Average and apply the step the contributions were for: it closes."""
    step, attempt = ledger.step, ledger.attempt
    members = [w for ids in by_stage.values() for w in ids]
    for kind in ("averaged", "applied"):
        for w in members:
            assert ledger.report(w, step, attempt, kind, 16.0, group_weight=4.0, digest="same")
    assert ledger.step == step + 1


def answer_all(ledger, by_stage, recompute=lambda row: claim(row["ticket"], row["stage"])) -> list[str]:
    verdicts = []
    for ids in by_stage.values():
        for w in ids:
            for row in ledger.spot_checks.pending_for(w, ledger.restore_epoch):
                verdicts.append(ledger.answer_check(w, row["id"], Commitment.from_bytes(recompute(row)), ""))
    return verdicts


@pytest.fixture
def swarm(tmp_path):
    ledger = make_replicated(tmp_path)
    ledger.spot_checks.rng = random.Random(5)
    return ledger, replicated_swarm(ledger)


def test_every_new_worker_is_checked_by_another_replica_of_its_stage(swarm):
    ledger, by_stage = swarm
    ledger.run.verify.sample_rate = 0.0  # only the first_checks of each new worker
    contribute(ledger, by_stage)
    rows = ledger.db.execute("SELECT * FROM checks WHERE kind='recompute'").fetchall()
    per_worker = {}
    for r in rows:
        per_worker.setdefault(r["worker"], []).append(r)
        (verifier,) = json.loads(r["peers"])
        stage_of = {w: s for s, ids in by_stage.items() for w in ids}
        assert verifier != r["worker"] and stage_of[verifier] == stage_of[r["worker"]] == r["stage"]
    assert {w: len(rs) for w, rs in per_worker.items()} == {w: 2 for ids in by_stage.values() for w in ids}
    pending = ledger.spot_checks.pending_for(by_stage[1][0], ledger.restore_epoch)
    assert pending and all(p["worker"] == by_stage[1][1] and p["address"] and p["blob"] for p in pending)
    assert answer_all(ledger, by_stage) == ["agree"] * 8
    counts = ledger.status()["verification"]
    assert (counts["spot_checks"], counts["spot_agree"], counts["spot_disagree"]) == (8, 8, 0)
    finish(ledger, by_stage)
    contribute(ledger, by_stage)  # the next step: they are no longer new, and nothing is sampled
    assert ledger.status()["verification"]["spot_checks"] == 8


def test_a_claim_the_recomputation_does_not_reproduce_is_a_disagreement_naming_both(swarm):
    ledger, by_stage = swarm
    liar = by_stage[1][1]
    contribute(ledger, by_stage, liar=liar)
    verdicts = answer_all(ledger, by_stage)
    rows = ledger.db.execute("SELECT * FROM checks WHERE kind='recompute'").fetchall()
    assert {r["verdict"] for r in rows if r["worker"] == liar} == {"disagree"}
    assert {r["verdict"] for r in rows if r["worker"] != liar} == {"agree"}
    assert verdicts.count("disagree") == sum(r["worker"] == liar for r in rows) > 0
    events = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "spot_check_failed"]
    assert events and all(liar in e and by_stage[1][0] in e and "relative error" in e for e in events)


def test_a_verifiers_run_state_names_its_newest_pending_check_until_it_is_answered(swarm):
    """The Watch stream carries the id (ledger/assignments.py), so a verifier asks for its check
    with a heartbeat at once instead of at its next beat; answered, the check is gone from it."""
    ledger, by_stage = swarm
    ledger.run.verify.sample_rate = 0.0  # only the first_checks of each new worker
    everyone = [w for ids in by_stage.values() for w in ids]
    assert [ledger.run_state(w)["newest_check"] for w in everyone] == [0] * len(everyone)
    contribute(ledger, by_stage)
    for w in everyone:
        pending = ledger.spot_checks.pending_for(w, ledger.restore_epoch)
        assert pending and ledger.run_state(w)["newest_check"] == max(r["id"] for r in pending)
    answer_all(ledger, by_stage)
    assert [ledger.run_state(w)["newest_check"] for w in everyone] == [0] * len(everyone)


def test_the_verified_fraction_counts_each_agreed_stage_micro_batch_of_closed_steps_once(swarm):
    ledger, by_stage = swarm
    ledger.run.verify.sample_rate = 0.0  # the first two of each worker: 8 (micro-batch, stage) pairs
    contribute(ledger, by_stage)
    assert answer_all(ledger, by_stage) == ["agree"] * 8
    # the step is still open: its work is not in the denominator yet, so nothing is counted
    assert ledger.status()["verification"]["spot_verified_tokens"] == 0
    finish(ledger, by_stage)
    tickets = ledger.db.execute("SELECT COUNT(*), SUM(tokens) FROM tickets WHERE step=0").fetchone()
    checked = ledger.db.execute("SELECT COUNT(DISTINCT stage || '/' || ticket) FROM checks WHERE kind='recompute'"
                                ).fetchone()[0]
    v = ledger.status()["verification"]
    assert v["spot_verified_tokens"] == checked * 128  # commit_all commits 128 tokens a micro-batch
    assert v["spot_verified_fraction"] == pytest.approx(checked * 128 / (tickets[1] * len(by_stage)))
    assert v["spot_verified_fraction"] == 1.0  # 4 micro-batches, each checked at both stages
    run_step(ledger, by_stage)  # the workers are no longer new: nothing drawn, nothing verified
    assert ledger.status()["verification"]["spot_verified_fraction"] == pytest.approx(0.5)
    ledger.recovery.rollback(0, "a test rollback")  # step 0 is to be trained again: its verification is gone
    assert ledger.status()["verification"]["spot_verified_tokens"] == 0


def test_answers_are_taken_once_and_only_from_the_verifier_asked(swarm):
    ledger, by_stage = swarm
    contribute(ledger, by_stage)
    verifier = by_stage[0][0]
    row = ledger.spot_checks.pending_for(verifier, ledger.restore_epoch)[0]
    good = Commitment.from_bytes(claim(row["ticket"], row["stage"]))
    assert ledger.answer_check(by_stage[1][0], row["id"], good, "") == "stale"  # not theirs to answer
    assert ledger.answer_check(verifier, row["id"], None, "evidence unavailable from w1 (NOT_FOUND: ...)") == \
        "unchecked"
    assert ledger.answer_check(verifier, row["id"], good, "") == "stale"  # already judged
    assert ledger.status()["verification"]["spot_unchecked"] == 1


def test_checks_nobody_answered_go_stale_when_the_step_after_closes(swarm):
    ledger, by_stage = swarm
    ledger.run.verify.sample_rate = 0.0  # step 1 draws none (its workers are not new): only step 0's wait
    contribute(ledger, by_stage)
    drawn = ledger.status()["verification"]["spot_checks"]
    finish(ledger, by_stage)
    assert ledger.status()["verification"]["spot_stale"] == 0  # step 0's verifiers still hold its weights
    contribute(ledger, by_stage)
    finish(ledger, by_stage)  # the close of step 1: a verifier keeps step 1's weights, not step 0's
    assert ledger.status()["verification"]["spot_stale"] == drawn
    epoch = ledger.restore_epoch
    assert all(not ledger.spot_checks.pending_for(w, epoch) for ids in by_stage.values() for w in ids)


def test_a_stage_without_another_replica_or_a_standby_is_not_spot_checked(tmp_path):
    ledger = make_replicated(tmp_path)
    assert ledger.spot_checks.draw(0, 0, 0, "w0", [1, 2, 3], ["w0"], 0) == 0  # step 0: the weights are known


@pytest.mark.parametrize("requested, device, expected", [
    ("fp32", '{"kind": "cuda"}', "fp32"), ("auto", '{"kind": "cpu"}', "fp32"), ("auto", '{"kind": "cuda"}', "bf16"),
    ("bf16", None, "bf16"), ("auto", "not json", "bf16"),
])
def test_the_tolerance_follows_each_sides_precision(requested, device, expected):
    assert precision_of(requested, device) == expected


def three_replicas(tmp_path, joined: int = 3):
    """One stage (the whole tiny model) with three replicas (`joined` of them now): a dispute has
    a third member to settle it."""
    run = small_run(steps=4, global_batch=12, micro_batch=2)
    run.pipeline.num_stages, run.pipeline.replicas_per_stage = 1, 3
    run.coordinator.heartbeat_timeout_s = 10.0
    ledger = RunLedger(at(tmp_path), run, plan_stages(4, 1), Clock())
    ledger.spot_checks.rng = random.Random(3)
    ids = ready_swarm(ledger, joined)
    assert all(ledger.assignment(w)["stage"] == 0 for w in ids)
    return ledger, {0: ids}


def run_step(ledger, by_stage) -> None:
    contribute(ledger, by_stage)
    finish(ledger, by_stage)


def dispute(ledger, by_stage, claimed_by: str, third_agrees: bool) -> tuple[str, str]:
    """A member that drew a check of `claimed_by`'s micro-batch recomputes it and disagrees; the
    third member answers as told. Returns (the accuser, the third member)."""
    ledger.run.verify.sample_rate = 1.0
    contribute(ledger, by_stage)
    epoch = ledger.restore_epoch
    accuser, row = next((w, r) for w in by_stage[0] if w != claimed_by for r in ledger.spot_checks.pending_for(w, epoch)
                        if r["worker"] == claimed_by and r["step"] == ledger.step)
    other = Commitment.from_bytes(claim(row["ticket"], row["stage"], 1.3))
    assert ledger.answer_check(accuser, row["id"], other, "") == "disagree"
    (third,) = [w for w in by_stage[0] if w not in (accuser, claimed_by)]
    (opinion,) = [r for r in ledger.spot_checks.pending_for(third, epoch)
                  if r["id"] > row["id"] and r["ticket"] == row["ticket"] and r["worker"] == claimed_by]
    answer = claim(row["ticket"], row["stage"]) if third_agrees else other.to_bytes()
    assert ledger.answer_check(third, opinion["id"], Commitment.from_bytes(answer), "") == \
        ("agree" if third_agrees else "disagree")
    return accuser, third


def test_a_worker_two_recomputations_disagree_with_is_quarantined_and_the_run_rolls_back(tmp_path):
    ledger, by_stage = three_replicas(tmp_path)
    liar = by_stage[0][0]
    run_step(ledger, by_stage)
    run_step(ledger, by_stage)
    assert ledger.step == 2
    accuser, _ = dispute(ledger, by_stage, liar, third_agrees=False)
    status = ledger.status()
    assert {w["id"]: w["state"] for w in status["workers"]}[liar] == "quarantined"
    assert status["verification"]["quarantined"] == 1
    (event,) = [e["detail"] for e in status["events"] if e["kind"] == "worker_quarantined"]
    assert liar in event and accuser in event and "disagreed too" in event
    # no checkpoint: every step it worked on is undone, from the initial weights
    assert (ledger.step, ledger.phase) == (0, "waiting") and status["history"] == []
    rolled = [e["detail"] for e in status["events"] if e["kind"] == "rolled_back"]
    assert rolled and f"{liar} quarantined" in rolled[-1]
    assert ledger.workers.quarantined_as("w0", "") == liar  # its next join under that name is refused
    assert ledger.workers.quarantined_as("w1", "") is None


def test_an_accuser_the_third_opinion_contradicts_is_the_one_quarantined(tmp_path):
    ledger, by_stage = three_replicas(tmp_path)
    honest = by_stage[0][0]
    accuser, _ = dispute(ledger, by_stage, honest, third_agrees=True)
    states = {w["id"]: w["state"] for w in ledger.status()["workers"]}
    assert states[accuser] == "quarantined" and states[honest] == "ready"
    (event,) = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "worker_quarantined"]
    assert accuser in event and "agreed with the claim" in event


def test_the_rollback_stops_at_the_newest_complete_checkpoint_before_the_worker_began(tmp_path):
    ledger, by_stage = three_replicas(tmp_path, joined=2)
    for _ in range(2):
        run_step(ledger, by_stage)
    ledger.record_checkpoint(2, StageSpec(0, 4, embed=True, head=True), "ckpt/step-2")
    late = ledger.join("late", "127.0.0.1:9100", {})["id"]  # joins while step 2 is open
    run_step(ledger, by_stage)
    ledger.heartbeat(late, "ready", {}, ledger.restore_epoch, ledger.step)  # copied the state: a member of step 3
    members = {0: by_stage[0] + [late]}
    assert ledger.step == 3 and sorted(ledger.assignment(late)["peer_ids"]) == sorted(members[0])
    dispute(ledger, members, late, third_agrees=False)
    # steps 0 and 1 had no output of it: the run goes back to the checkpoint of step 2, not to 0
    assert (ledger.step, ledger.phase) == (2, "waiting")
    assert [h["step"] for h in ledger.status()["history"]] == [0, 1]


def test_a_rollback_forgets_the_checkpoints_of_the_steps_it_undoes(tmp_path):
    """They hold the undone work (a quarantined worker's): no later restore or spot check may use them."""
    ledger, by_stage = three_replicas(tmp_path)
    for step in (1, 2):
        run_step(ledger, by_stage)
        ledger.record_checkpoint(step, StageSpec(0, 4, embed=True, head=True), f"ckpt/step-{step}")
    ledger.recovery.rollback(1, "a test rollback")
    checkpoints = ledger.status()["checkpoints"]
    assert checkpoints["steps"] == [1] and checkpoints["latest_complete"] == 1
    (rolled,) = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "rolled_back"]
    assert "the checkpoints of steps [2] are forgotten" in rolled


def test_the_operator_lifts_a_quarantine_and_the_name_may_join_again(tmp_path):
    ledger, by_stage = three_replicas(tmp_path)
    honest = by_stage[0][0]
    accuser, _ = dispute(ledger, by_stage, honest, third_agrees=True)
    name = ledger.worker(accuser)["name"]
    assert ledger.workers.quarantined_as(name, "") == accuser
    with pytest.raises(OperatorError, match=f"quarantined now: {accuser}"):
        ledger.lift_quarantine(honest)  # not quarantined
    assert ledger.lift_quarantine(accuser) == {"worker": accuser, "name": name}
    assert ledger.workers.quarantined_as(name, "") is None
    assert ledger.status()["verification"]["quarantined"] == 0
    assert [e["kind"] for e in ledger.status()["events"]][-1] == "quarantine_lifted"


def test_a_local_steps_run_draws_no_spot_checks(tmp_path):
    """Replicas' weights differ between outer steps: no replica can recompute another's work."""
    ledger = make_replicated(tmp_path)
    ledger.run.averaging.mode = "local-steps"
    book = SpotCheckBook(ledger.db, ledger.events, ledger.run, random.Random(1))
    assert book.draw(0, 0, 0, "w0", [1, 2, 3], ["w0", "w1"], 0) == 0


def one_replica_and_standbys(tmp_path, standbys: int):
    """Two stages with one replica each, checkpoints every 2 steps, and `standbys` workers without
    a stage: they check the stages, with weights from the store (or the model source at step 0)."""
    ledger = make(tmp_path, steps=8)
    ledger.run.train.checkpoint_every = 2
    ledger.spot_checks.rng = random.Random(7)
    ids = ready_swarm(ledger, 2)
    spare = [ledger.join(f"s{i}", f"127.0.0.1:{9100 + i}", {})["id"] for i in range(standbys)]
    for w in spare:
        ledger.heartbeat(w, "standby", {}, -1, -1)
    assert [ledger.assignment(w)["stage"] for w in spare] == [-1] * standbys
    return ledger, {ledger.assignment(w)["stage"]: [w] for w in ids}, spare


def close_step(ledger, by_stage, checkpoint: bool = False) -> None:
    """Apply the step the contributions were for (single replicas: no averaging); with
    `checkpoint`, every stage stores its state first, as a worker does before reporting."""
    step, attempt = ledger.step, ledger.attempt
    for stage, (w,) in by_stage.items():
        if checkpoint:
            ledger.record_checkpoint(step + 1, ledger.plan[stage], f"ckpt/{step + 1}-{stage}")
        assert ledger.report(w, step, attempt, "applied", digest="d")
    assert ledger.step == step + 1


def test_a_stage_without_another_replica_is_checked_by_a_standby_where_the_store_holds_its_weights(tmp_path):
    ledger, by_stage, spare = one_replica_and_standbys(tmp_path, standbys=1)
    ledger.run.verify.sample_rate = 0.5  # x checkpoint_every (2): every micro-batch of a stored step
    contribute(ledger, by_stage)  # step 0: the model source holds its weights
    rows = ledger.spot_checks.pending_for(spare[0], ledger.restore_epoch)
    assert len(rows) == 4 and {r["weights"] for r in rows} == {"source"}, rows
    assert {r["stage"]: r["spec"] for r in rows} == dict(enumerate(ledger.plan))
    assert ledger.assignment(by_stage[0][0])["verifier_ids"] == spare  # its check pending: it may fetch the evidence
    verdicts = [ledger.answer_check(spare[0], r["id"], Commitment.from_bytes(claim(r["ticket"], r["stage"])), "")
                for r in rows]
    assert verdicts == ["agree"] * 4
    assert ledger.assignment(by_stage[0][0])["verifier_ids"] == []  # nothing pending: no standby may fetch
    close_step(ledger, by_stage)  # no checkpoint of step 1 (every 2 steps): its work has no standby check
    contribute(ledger, by_stage)
    assert not ledger.spot_checks.pending_for(spare[0], ledger.restore_epoch)
    close_step(ledger, by_stage, checkpoint=True)  # stores the state of step 2
    contribute(ledger, by_stage)
    rows = ledger.spot_checks.pending_for(spare[0], ledger.restore_epoch)
    assert len(rows) == 4 and {(r["step"], r["weights"]) for r in rows} == {(2, "store")}, rows
    close_step(ledger, by_stage)  # a replica's check would be stale now; the stage keeps 4 steps of evidence
    assert ledger.status()["verification"]["spot_stale"] == 0
    for _ in range(4):
        contribute(ledger, by_stage)
        close_step(ledger, by_stage)
    assert ledger.status()["verification"]["spot_stale"] == 4  # step 2's, at the close of step 2 + 4


def test_a_single_replica_two_standbys_disagree_with_is_quarantined(tmp_path):
    ledger, by_stage, spare = one_replica_and_standbys(tmp_path, standbys=2)
    liar = by_stage[1][0]
    contribute(ledger, by_stage, liar=liar)
    epoch = ledger.restore_epoch
    accuser, row = next((w, r) for w in spare for r in ledger.spot_checks.pending_for(w, epoch) if r["worker"] == liar)
    honest = Commitment.from_bytes(claim(row["ticket"], row["stage"]))  # what the liar should have sent
    assert ledger.answer_check(accuser, row["id"], honest, "") == "disagree"
    (third,) = [w for w in spare if w != accuser]
    (opinion,) = [r for r in ledger.spot_checks.pending_for(third, epoch) if r["id"] > row["id"]]
    assert opinion["weights"] == "source" and opinion["worker"] == liar
    assert ledger.answer_check(third, opinion["id"], honest, "") == "disagree"
    states = {w["id"]: w["state"] for w in ledger.status()["workers"]}
    assert states[liar] == "quarantined" and "quarantined" not in (states[accuser], states[third])
    assert "loading" in (states[accuser], states[third])  # a standby takes the liar's stage


def test_with_one_standby_a_dispute_stays_open(tmp_path):
    ledger, by_stage, (standby,) = one_replica_and_standbys(tmp_path, standbys=1)
    contribute(ledger, by_stage, liar=by_stage[0][0])
    row = next(r for r in ledger.spot_checks.pending_for(standby, ledger.restore_epoch) if r["stage"] == 0)
    assert ledger.answer_check(standby, row["id"], Commitment.from_bytes(claim(row["ticket"], 0)), "") == "disagree"
    (event,) = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "spot_check_disputed"]
    assert "no third standby" in event and ledger.status()["verification"]["quarantined"] == 0


def test_checks_pending_when_the_run_ends_go_stale_and_a_late_answer_changes_nothing(swarm):
    ledger, by_stage = swarm
    ledger.run.verify.sample_rate = 1.0  # the last step's micro-batches are drawn too
    for _ in range(ledger.run.train.steps):
        contribute(ledger, by_stage)
        finish(ledger, by_stage)
    assert ledger.phase == "done"
    counts = ledger.status()["verification"]
    assert counts["spot_stale"] > 0 and not ledger.db.execute(
        "SELECT 1 FROM checks WHERE kind='recompute' AND verdict='pending'").fetchone()
    row = ledger.db.execute("SELECT * FROM checks WHERE kind='recompute' AND detail LIKE '%run ended%'").fetchone()
    verifier = json.loads(row["peers"])[0]
    late = Commitment.from_bytes(claim(row["ticket"], row["stage"], 1.2))  # a disagreement, too late
    assert ledger.answer_check(verifier, row["id"], late, "") == "stale"
    assert ledger.status()["verification"]["spot_disagree"] == counts["spot_disagree"]


def checks_drawn(ledger, worker: str, step: int) -> int:
    return ledger.db.execute("SELECT COUNT(*) FROM checks WHERE kind='recompute' AND worker=? AND step=? AND "
                             "opinion_of IS NULL", (worker, step)).fetchone()[0]


def test_both_sides_of_a_dispute_a_late_third_opinion_left_open_are_checked_until_it_is_settled(tmp_path):
    """The third opinion must come while the step's weights are kept; when it comes too late (stale)
    the liar's disagreement is not forgotten: at sample rate 0 both sides still have
    verify.dispute_checks of each contribution drawn, and the next dispute, settled in time,
    quarantines the liar and ends the extra checks."""
    ledger, by_stage = three_replicas(tmp_path)
    liar = by_stage[0][0]
    run_step(ledger, by_stage)  # every worker's first_checks
    ledger.run.verify.sample_rate = 1.0
    contribute(ledger, by_stage)
    epoch, step = ledger.restore_epoch, ledger.step
    accuser, row = next((w, r) for w in by_stage[0] if w != liar for r in ledger.spot_checks.pending_for(w, epoch)
                        if r["worker"] == liar and r["step"] == step)
    lie = Commitment.from_bytes(claim(row["ticket"], row["stage"], 1.3))  # the accuser's recomputation differs
    assert ledger.answer_check(accuser, row["id"], lie, "") == "disagree"
    (third,) = [w for w in by_stage[0] if w not in (accuser, liar)]
    assert ledger.spot_checks.in_unsettled_dispute(liar) and ledger.spot_checks.in_unsettled_dispute(accuser)
    assert not ledger.spot_checks.in_unsettled_dispute(third)
    finish(ledger, by_stage)
    ledger.run.verify.sample_rate = 0.0
    run_step(ledger, by_stage)  # the third never answered: the close of the step after makes it stale
    (opinion,) = ledger.db.execute("SELECT verdict FROM checks WHERE opinion_of=?", (row["id"],)).fetchall()
    assert opinion["verdict"] == "stale"
    assert ledger.spot_checks.in_unsettled_dispute(liar) and ledger.spot_checks.in_unsettled_dispute(accuser)
    # that step, at rate 0, already drew dispute_checks (2) of each side's 2 micro-batches, none of the third's
    assert [checks_drawn(ledger, w, ledger.step - 1) for w in (liar, accuser, third)] == [2, 2, 0]

    contribute(ledger, by_stage)  # a new dispute about the liar's work, settled in time this time
    epoch, step = ledger.restore_epoch, ledger.step
    verifier, row = next((w, r) for w in by_stage[0] if w != liar for r in ledger.spot_checks.pending_for(w, epoch)
                         if r["worker"] == liar and r["step"] == step)
    other = Commitment.from_bytes(claim(row["ticket"], row["stage"], 1.3))
    assert ledger.answer_check(verifier, row["id"], other, "") == "disagree"
    (settler,) = [w for w in by_stage[0] if w not in (verifier, liar)]
    (ask,) = [r for r in ledger.spot_checks.pending_for(settler, epoch) if r["id"] > row["id"]
              and r["ticket"] == row["ticket"] and r["worker"] == liar]
    assert ledger.answer_check(settler, ask["id"], other, "") == "disagree"
    assert {w["id"]: w["state"] for w in ledger.status()["workers"]}[liar] == "quarantined"
    assert not ledger.spot_checks.in_unsettled_dispute(accuser)  # its dispute's other side is quarantined


def test_a_dispute_no_third_could_be_asked_about_draws_no_extra_checks(swarm):
    """Two replicas a stage: a disagreement has no third member to settle it, and checking its two
    sides again would only repeat it."""
    ledger, by_stage = swarm
    liar = by_stage[1][1]
    contribute(ledger, by_stage, liar=liar)
    assert "disagree" in answer_all(ledger, by_stage)
    assert not ledger.spot_checks.in_unsettled_dispute(liar)
    assert not ledger.spot_checks.in_unsettled_dispute(by_stage[1][0])


def test_dispute_checks_zero_leaves_a_dispute_to_the_sample_rate(tmp_path):
    ledger, by_stage = three_replicas(tmp_path)
    ledger.run.verify.dispute_checks = 0
    liar = by_stage[0][0]
    run_step(ledger, by_stage)
    ledger.run.verify.sample_rate = 1.0
    contribute(ledger, by_stage)
    epoch, step = ledger.restore_epoch, ledger.step
    accuser, row = next((w, r) for w in by_stage[0] if w != liar for r in ledger.spot_checks.pending_for(w, epoch)
                        if r["worker"] == liar and r["step"] == step)
    assert ledger.answer_check(accuser, row["id"], Commitment.from_bytes(claim(row["ticket"], row["stage"], 1.3)),
                               "") == "disagree"
    finish(ledger, by_stage)
    ledger.run.verify.sample_rate = 0.0
    contribute(ledger, by_stage)
    assert ledger.spot_checks.in_unsettled_dispute(liar)
    assert [checks_drawn(ledger, w, ledger.step) for w in by_stage[0]] == [0, 0, 0]
