"""bench.swarm_run.whole_run counts every closed step of a run from its ledger, where the status
object lists only the newest HISTORY_STEPS: bench gradsync's full form (321 steps) divided its
bytes by the status history's 200 steps and reported ratios 1.6x too low."""

from __future__ import annotations

from bench.swarm_run import whole_run
from coordinator.ledger.db import LedgerDB
from coordinator.ledger.history import HISTORY_STEPS, StepHistory
from tests.unit.test_ledger import Clock


def test_whole_run_counts_every_closed_step_past_the_status_history(tmp_path):
    clock = Clock()
    db = LedgerDB(tmp_path / "run.db", clock)
    history = StepHistory(db)
    steps = HISTORY_STEPS + 121
    for step in range(steps):
        opened = clock.t
        clock.t += 0.5  # each step takes 0.5 s
        history.close(step, 2 if step % 100 == 7 else 1, 6.0, 1024, 1.0, opened, {})
    assert len(history.recent()) == HISTORY_STEPS  # what the status object lists
    run = whole_run(tmp_path)
    assert run["steps"] == steps and run["step_reruns"] == 4  # steps 7, 107, 207, 307 ran twice
    assert abs(run["seconds"] - 0.5 * steps) < 1e-6
