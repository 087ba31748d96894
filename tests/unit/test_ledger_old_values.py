"""Values an older ledger may hold are read defensively (coordinator/ledger/stored_values.py).

Before the validation layer, one bad number could brick a ledger for good: a negative norm^2
made the step's norm a complex number, stored as text in `meta`; a NaN loss is NULL in SQLite;
a NaN metric sits in the metrics JSON. These tests write such values with sqlite3, as an old
version left them, then read the ledger: status(), run_state() and the step machine go on.
"""

from __future__ import annotations

import json
import math
import sqlite3

from coordinator.ledger import APPLYING, RunLedger
from coordinator.scheduler import plan_stages
from tests.unit.test_ledger import (Clock, commit_all, finish_step, make, make_replicated, ready_swarm,
                                    replicated_swarm)


def write(ledger: RunLedger, *statements: tuple[str, tuple]) -> None:
    """Write with a connection of our own, as another (older) process would have."""
    with sqlite3.connect(str(ledger.path)) as conn:
        for sql, args in statements:
            conn.execute(sql, args)


def reopened(ledger: RunLedger) -> RunLedger:
    ledger.db.close()
    return RunLedger(ledger.path, ledger.run, plan_stages(4, len(ledger.plan)), Clock())


def test_status_and_run_state_survive_what_an_older_ledger_holds(tmp_path):
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    finish_step(ledger, ids)  # step 0 is in the history
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        ledger.commit(ids[0], t.id, t.attempt, 1.0, 128)
    for w in ids:
        ledger.report(w, 1, 0, "contribution", 4.0, 2)
    assert ledger.phase == APPLYING
    write(ledger,
          ("UPDATE meta SET value=? WHERE key='grad_norm'", ("(1.2246467991473532e-16+2j)",)),  # the complex norm
          ("UPDATE workers SET metrics=? WHERE id=?", ('{"micro_batches_per_s": NaN, "busy_fraction": 0.5, '
                                                      '"bytes_sent": Infinity, "gradient_codec": "q8"}', ids[0])),
          ("UPDATE workers SET metrics='not json', device='[1, 2]', dht_maddrs='{oops' WHERE id=?", (ids[1],)),
          ("UPDATE steps SET grad_norm=?, detail='not json' WHERE step=0", ("(1+1j)",)),
          ("INSERT INTO steps VALUES(5, 1, 'NaN', 0, NULL, 0, 1, '{}')", ()))
    ledger = reopened(ledger)

    state = ledger.run_state(ids[0])
    assert state["phase"] == APPLYING and math.isnan(state["global_grad_norm"])  # workers skip the update
    status = ledger.status()
    json.dumps(status, allow_nan=False)  # standard JSON: the live page can parse it
    assert [h["grad_norm"] for h in status["history"]] == [None, None]
    assert status["history"][0]["stages"] == {} and status["history"][1]["loss"] is None
    metrics = {w["id"]: w["metrics"] for w in status["workers"]}
    assert metrics[ids[0]] == {"busy_fraction": 0.5, "gradient_codec": "q8"} and metrics[ids[1]] == {}
    assert ledger.worker_dht_peers() == []
    for w in ids:  # the step closes: its NaN norm is stored as NULL, and the run goes on
        assert ledger.report(w, 1, 0, "applied")
    assert ledger.step == 2 and ledger.status()["history"][1]["grad_norm"] is None


def test_a_step_whose_every_loss_is_nan_still_closes(tmp_path):
    """An honestly diverged model: every micro-batch's loss NaN (SQLite stores NULL), its norm NaN.
    The step closes with its update skipped and a loss of +Inf (shown as null); the next opens."""
    ledger = make(tmp_path, steps=3)
    ids = ready_swarm(ledger, 2)
    for losses in ([math.nan, math.nan], [1.0, math.nan]):
        step = ledger.step
        tickets, _ = ledger.lease(ids[0], 100)
        for t, loss in zip(tickets, losses):
            assert ledger.commit(ids[0], t.id, t.attempt, loss, 128) == "committed"
        for w in ids:
            assert ledger.report(w, step, 0, "contribution", math.nan, 2)
        assert ledger.phase == APPLYING and math.isnan(ledger.global_grad_norm())
        for w in ids:
            assert ledger.report(w, step, 0, "applied")
        assert ledger.step == step + 1 and ledger.phase == "open"
    status = ledger.status()
    json.dumps(status, allow_nan=False)
    assert [(h["loss"], h["grad_norm"]) for h in status["history"]] == [(None, None), (None, None)]
    assert status["tickets"]["exactly_once_violations"] == []


def test_a_negative_norm_an_older_version_stored_is_judged_poisoned_not_a_crash(tmp_path):
    """sqrt of a negative stored norm^2 raised in the step machine; read back it is NaN and refused."""
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    commit_all(ledger, by_stage[0])
    members = [*by_stage[0], *by_stage[1]]
    for w in members[:-1]:
        ledger.report(w, 0, 0, "contribution", 4.0, 2)
    bad = members[0]
    write(ledger, ("UPDATE reports SET grad_norm_sq=-4.0 WHERE worker=?", (bad,)))
    assert ledger.report(members[-1], 0, 0, "contribution", 4.0, 2)
    assert ledger.phase == "averaging" and bad not in ledger.assignment(bad)["contributors"]
    assert any(bad in e["detail"] for e in ledger.status()["events"] if e["kind"] == "poisoned_update")
