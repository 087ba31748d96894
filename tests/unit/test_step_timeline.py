"""bench.step_timeline splits a pipelined step into periods and a bubble, from the real ledger's
steps and tickets tables (bench link reports it for the chosen codecs' run)."""

from __future__ import annotations

import pytest

from bench.step_timeline import step_timeline
from coordinator.ledger.db import LedgerDB
from coordinator.ledger.history import StepHistory
from tests.unit.test_ledger import Clock


def _run(tmp_path, steps: int, micro_batches: int, fill_s: float, period_s: float, tail_s: float) -> None:
    clock = Clock()
    db = LedgerDB(tmp_path / "run.db", clock)
    history = StepHistory(db)
    for step in range(steps):
        opened = clock.t
        attempt = 1 if step == 2 else 0  # a re-run step: only its final attempt's commits count
        if attempt:
            db.conn.execute("INSERT INTO tickets (step, attempt, idx, shard, offset, state, committed_at) "
                            "VALUES (?, 0, 0, 0, 0, 'committed', ?)", (step, opened + 0.01))
        for i in range(micro_batches):
            db.conn.execute("INSERT INTO tickets (step, attempt, idx, shard, offset, state, committed_at) VALUES "
                            "(?, ?, ?, 0, 0, 'committed', ?)", (step, attempt, i, opened + fill_s + i * period_s))
        clock.t = opened + fill_s + (micro_batches - 1) * period_s + tail_s
        history.close(step, attempt + 1, 6.0, 1024, 1.0, opened, {})


def test_a_step_splits_into_periods_a_fill_and_a_tail(tmp_path):
    _run(tmp_path, steps=4, micro_batches=16, fill_s=0.6, period_s=0.2, tail_s=0.1)
    t = step_timeline(tmp_path)
    assert t["micro_batches"] == 16
    assert t["period_s"] == pytest.approx(0.2)
    assert t["first_commit_s"] == pytest.approx(0.6)
    assert t["tail_s"] == pytest.approx(0.1)
    # step = 0.6 + 15 x 0.2 + 0.1 = 3.7 s; 16 periods are 3.2 s
    assert t["bubble_s"] == pytest.approx(0.5)


def test_a_run_with_nothing_after_the_warm_up_is_refused_by_name(tmp_path):
    _run(tmp_path, steps=1, micro_batches=4, fill_s=0.5, period_s=0.2, tail_s=0.1)
    with pytest.raises(ValueError, match="no closed step after step 1"):
        step_timeline(tmp_path)
