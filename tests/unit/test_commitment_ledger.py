"""The ledger's commitments and chain checks (coordinator/ledger/commitments.py): kept with a
CONTRIBUTION, checked at the step close, a mismatch recorded, named and counted, never quarantined."""

from __future__ import annotations

import hashlib
import json

import pytest

import torch

from coordinator.ledger import Submitted
from coordinator.ledger.commitments import KEEP_STEPS
from gptjt_core.commitment import Commitment
from gptjt_core.sketching import sketch_tensor
from tests.unit.test_ledger import make, ready_swarm

pytestmark = pytest.mark.usefixtures("both_ledger_backends")  # SQLite and PostgreSQL


def digest(*parts) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def blob(input_: bytes) -> bytes:
    return Commitment(input_, sketch_tensor(torch.ones(2, 4, 8))).to_bytes()


def honest(ticket: int, attempt: int, stage: int, stages: int = 2) -> Submitted:
    """What an honest stage commits to: the codes it got are those the stage before sent."""
    got = digest("tokens", ticket) if stage == 0 else digest("down", ticket, stage - 1)
    last = stage == stages - 1
    return Submitted(ticket, attempt, blob(got), None if last else digest("down", ticket, stage),
                     None if last else digest("up", ticket, stage + 1),
                     None if stage == 0 else digest("up", ticket, stage))


def chain_counts(ledger) -> dict[str, int]:
    """The status's verification counters of the chain check (spot checks have their own tests)."""
    return {k: v for k, v in ledger.status()["verification"].items() if k in ("commitments", "checks", "mismatches")}


def run_step(ledger, ids, tamper=None) -> list[int]:
    """Commit every ticket, report contributions with commitments (`tamper(stage, c)` may change
    one), apply: the step closes. Returns the tickets."""
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        assert ledger.commit(ids[0], t.id, t.attempt, 1.0, 128) == "committed"
    step, attempt = ledger.step, ledger.attempt
    for stage, w in enumerate(ids):
        mine = [honest(t.id, attempt, stage) for t in tickets]
        if tamper:
            mine = [tamper(stage, c) for c in mine]
        assert ledger.report(w, step, attempt, "contribution", 4.0, 2, commitments=mine)
    for w in ids:
        assert ledger.report(w, step, attempt, "applied")
    assert ledger.step == step + 1
    return [t.id for t in tickets]


def test_an_honest_chain_is_checked_and_agrees(tmp_path):
    ledger = make(tmp_path)
    ids = ready_swarm(ledger, 2)
    tickets = run_step(ledger, ids)
    assert chain_counts(ledger) == {"commitments": 2 * len(tickets), "checks": len(tickets),
                                               "mismatches": 0}
    checks = ledger.commitments.checks(0)
    assert {c["verdict"] for c in checks} == {"chain_ok"} and sorted(c["ticket"] for c in checks) == sorted(tickets)
    assert not [e for e in ledger.status()["events"] if e["kind"] == "commitment_mismatch"]


def test_a_tampered_digest_is_a_mismatch_naming_both_workers_and_the_ticket(tmp_path):
    ledger = make(tmp_path)
    ids = ready_swarm(ledger, 2)
    victim = []

    def tamper(stage: int, c: Submitted) -> Submitted:
        if stage == 1 and not victim:  # stage 1 claims to have received other codes for one ticket
            victim.append(c.ticket)
            return c._replace(blob=blob(digest("not what was sent")))
        return c

    tickets = run_step(ledger, ids, tamper)
    assert chain_counts(ledger) == {"commitments": 4, "checks": 2, "mismatches": 1}
    (bad,) = [c for c in ledger.commitments.checks(0) if c["verdict"] == "chain_mismatch"]
    assert (bad["ticket"], bad["stage"], bad["worker"], json.loads(bad["peers"])) == (victim[0], 0, ids[0], [ids[1]])
    (event,) = [e for e in ledger.status()["events"] if e["kind"] == "commitment_mismatch"]
    assert f"ticket {victim[0]}" in event["detail"] and ids[0] in event["detail"] and ids[1] in event["detail"]
    assert "committed to sending codes" in event["detail"]
    assert {w["state"] for w in ledger.status()["workers"]} == {"ready"}  # nobody quarantined on this alone
    assert sorted(tickets) == sorted(c["ticket"] for c in ledger.commitments.checks(0))


def test_commitments_of_other_attempts_or_steps_are_not_kept(tmp_path):
    ledger = make(tmp_path)
    ids = ready_swarm(ledger, 2)
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        ledger.commit(ids[0], t.id, t.attempt, 1.0, 128)
    stray = [honest(tickets[0].id, 5, 0), honest(999, 0, 0), honest(tickets[1].id, 0, 0)]
    assert ledger.report(ids[0], 0, 0, "contribution", 4.0, 2, commitments=stray)
    assert ledger.status()["verification"]["commitments"] == 1
    assert [r.ticket for r in ledger.commitments.records(0, 0)] == [tickets[1].id]


def test_old_commitments_are_let_go_and_the_counts_stay(tmp_path):
    ledger = make(tmp_path, steps=KEEP_STEPS + 3)
    ids = ready_swarm(ledger, 2)
    for _ in range(KEEP_STEPS + 2):
        run_step(ledger, ids)
    kept = {r[0] for r in ledger.db.execute("SELECT DISTINCT step FROM commitments")}
    assert kept == set(range(1, KEEP_STEPS + 2))
    assert chain_counts(ledger) == {"commitments": 4 * (KEEP_STEPS + 2), "checks": 2 * (KEEP_STEPS + 2),
                                               "mismatches": 0}
    # checks that agreed go with the commitments they read; the counts stay
    assert {r[0] for r in ledger.db.execute("SELECT DISTINCT step FROM checks")} == set(range(1, KEEP_STEPS + 2))


def test_a_mismatch_outlives_the_commitments_it_was_found_in(tmp_path):
    ledger = make(tmp_path, steps=KEEP_STEPS + 3)
    ids = ready_swarm(ledger, 2)
    run_step(ledger, ids, lambda stage, c: c._replace(blob=blob(digest("other codes"))) if stage == 1 else c)
    for _ in range(KEEP_STEPS + 1):
        run_step(ledger, ids)
    assert ledger.db.execute("SELECT COUNT(*) FROM commitments WHERE step = 0").fetchone()[0] == 0
    assert {c["verdict"] for c in ledger.commitments.checks(0)} == {"chain_mismatch"}  # the evidence stays
    assert ledger.status()["verification"]["mismatches"] == 2
