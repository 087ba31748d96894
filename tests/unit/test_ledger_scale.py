"""What keeps a coordinator of thousands of workers responsive: which transactions wake Watch
streams, the read-only reader the status process uses, and assignments read once per ledger state."""

from __future__ import annotations

import sqlite3

import pytest

from coordinator.ledger import OPEN
from coordinator.ledger.reader import LedgerReader
from coordinator.scheduler import plan_stages
from tests.unit.test_ledger import make, ready_swarm


def test_routine_heartbeats_and_mid_step_commits_wake_no_watch_stream(tmp_path):
    ledger = make(tmp_path)
    a, b = ready_swarm(ledger, 2)
    assert ledger.phase == OPEN
    v = ledger.version
    ledger.heartbeat(a, "ready", {"micro_batches_per_s": 2.0}, ledger.restore_epoch, ledger.step)
    assert ledger.version == v  # liveness and metrics only
    tickets, _ = ledger.lease(a, 100)
    assert len(tickets) == 2 and ledger.version == v  # tickets are in no RunState
    assert ledger.commit(a, tickets[0].id, tickets[0].attempt, 1.0, 128) == "committed"
    assert ledger.version == v and ledger.phase == OPEN
    assert ledger.commit(a, tickets[1].id, tickets[1].attempt, 1.0, 128) == "committed"
    assert ledger.version > v and ledger.phase != OPEN  # the last one closes the phase: streams must hear
    v = ledger.version
    ledger.heartbeat(b, "draining", {}, ledger.restore_epoch, ledger.step)
    assert ledger.version > v  # a state change is news
    v = ledger.version
    ledger.reap()  # a pass that writes nothing
    assert ledger.version == v


def test_the_reader_sees_each_commit_and_cannot_write(tmp_path):
    ledger = make(tmp_path)
    reader = LedgerReader(ledger.path, ledger.run, plan_stages(4, 2), ledger.shape, ledger.clock)
    assert reader.status()["workers"] == []
    a, _ = ready_swarm(ledger, 2)
    status = reader.status()
    assert [w["id"] for w in status["workers"]][0] == a and status["phase"] == "open"
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.ledger.db.execute("UPDATE meta SET value='x' WHERE key='phase'")
    reader.close()


def test_assignments_read_the_workers_once_per_ledger_state(tmp_path, monkeypatch):
    ledger = make(tmp_path)
    ids = ready_swarm(ledger, 2) + [ledger.join(f"s{i}", f"127.0.0.1:{9100 + i}", {})["id"] for i in range(20)]
    calls = []
    real = ledger.workers.stage_workers
    monkeypatch.setattr(ledger.workers, "stage_workers", lambda: calls.append(1) or real())
    states = [ledger.run_state(w) for w in ids]
    assert len(calls) == 1  # one read for 22 streams woken by one change
    assert states[0]["assignment"]["stage"] == 0 and states[-1]["assignment"]["stage"] == -1
    ledger.heartbeat(ids[3], "standby", {"micro_batches_per_s": 1.0}, -1, -1)  # quiet: nothing to re-read
    ledger.run_state(ids[0])
    assert len(calls) == 1
    ledger.leave(ids[4])
    ledger.run_state(ids[0])
    assert len(calls) == 2


def test_the_status_process_imports_no_torch():
    """It starts on every coordinator start and restart: torch would add seconds (and it only reads)."""
    import subprocess
    import sys

    code = ("import sys, coordinator.status_process, coordinator.ledger.reader, coordinator.dashboard.metrics; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_the_placed_workers_are_read_without_visiting_the_standbys(tmp_path):
    """Read at every change of the ledger's version: a scan of every worker, mostly standbys at
    10,000 workers, held the coordinator's loop for minutes when all their streams closed at once."""
    ledger = make(tmp_path)
    placed = set(ready_swarm(ledger, 2))
    for i in range(50):
        ledger.join(f"standby-{i}", f"h:{9000 + i}", {"kind": "cpu"})
    plan = " ".join(str(row[-1]) for row in ledger.db.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM workers WHERE stage>=0 AND state IN ('ready') ORDER BY joined"))
    assert "USING INDEX workers_placed" in plan and "TEMP B-TREE" not in plan  # the partial index, in order
    assert {r["id"] for rows in ledger.workers.stage_workers().values() for r in rows} == placed
