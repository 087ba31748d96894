"""A stage whose last worker dies while it loads, with no standby to take its place.

That worker held no state (coordinator/ledger/recovery.drop_worker: nothing is lost), so the
run did not restore; the search then found a plan for the survivors and left it pending for the
next complete checkpoint. No step can run with an empty stage, so no checkpoint came and the run
waited forever (found in 2026-12-07's review, by a death during a checkpoint re-plan's reload).
"""

from __future__ import annotations

import pytest

from tests.unit.test_replan_stall import checkpoint_replan_reloading
from tests.unit.test_scheduler import device

pytestmark = pytest.mark.usefixtures("both_ledger_backends")


def test_the_waiting_plan_applies_at_once_and_the_run_goes_on(tmp_path):
    ledger, clock, ids = checkpoint_replan_reloading(tmp_path)
    survivor, lost = ids
    stage_lost = next(w["stage"] for w in ledger.status()["workers"] if w["id"] == lost)
    ledger.declare_dead(lost, "its process vanished while it loaded")
    events = ledger.status()["events"]
    vacant = [e["detail"] for e in events if e["kind"] == "stage_vacant"]
    assert vacant and f"stage {stage_lost} lost {lost}, its last worker, while it loaded" in vacant[-1], vacant
    assert ledger.status()["plan"]["ranges"] == [[0, 4]]  # the survivor takes the whole model
    assert not ledger.status()["plan"]["pending"]
    clock.t += 10.0
    ledger.heartbeat(survivor, "ready", {}, ledger.restore_epoch, 1)
    assert (ledger.phase, ledger.step) == ("open", 1)  # step 1 runs from the checkpoint of step 1: nothing lost
    assert ledger.exactly_once_counts() == {"lost": 0, "double": 0}


def test_a_stage_that_keeps_a_loading_worker_loads_on_and_restores_nothing(tmp_path):
    """Only a stage left empty applies the waiting plan: with another replica loading it, nothing
    is lost and the pending plan waits for its checkpoint as before (no extra reload for anyone)."""
    ledger, clock, ids = checkpoint_replan_reloading(tmp_path)
    extra = ledger.join("c", "h:c", device(0.001))["id"]
    by_id = {w["id"]: w for w in ledger.status()["workers"]}
    lost = next(w for w in ids if by_id[w]["stage"] == by_id[extra]["stage"])  # c joined as its replica
    epoch, ranges = ledger.restore_epoch, ledger.status()["plan"]["ranges"]
    ledger.declare_dead(lost, "its process vanished while it loaded")
    assert ledger.restore_epoch == epoch and ledger.status()["plan"]["ranges"] == ranges
    assert not any(e["kind"] == "stage_vacant" for e in ledger.status()["events"])
