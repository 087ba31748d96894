"""The loss-scale drill on real processes: an fp16-style overflow injected into one stage at step 2.

CPU autocast has no fp16, so the overflow is simulated (GPTJT_FAULTS inf@2: one inf in the last
stage's gradient, as an fp16 overflow leaves). The run scales in fp32 with fp32 codecs, where
powers-of-two scales are exact: so the swarm must match train-local (which never overflows)
on every step, the overflowed one included, because that step is re-run at half the scale and
neither stage applied the overflowed attempt.
"""

from __future__ import annotations

import sqlite3

import pytest

from tests.swarm import Swarm, local_losses, swarm_toml

SCALING = 'precision = "fp32"\nloss_scaling = "dynamic"\nloss_scale_init = 1024\nloss_scale_growth_every = 2'


def test_an_overflow_at_one_stage_reruns_the_step_at_half_the_scale_everywhere(tmp_path, swarms):
    config = swarm_toml(tmp_path, steps=6)
    config.write_text(config.read_text().replace('precision = "fp32"', SCALING))
    swarm = Swarm(tmp_path, config)
    swarms.append(swarm)
    swarm.start_coordinator()
    swarm.start_worker("a").wait_for("joined", 120)  # stage 0
    swarm.start_worker("b", env={"GPTJT_FAULTS": "inf@2"}).wait_for("joined", 120)  # stage 1, the last
    status = swarm.wait(lambda s: s["phase"] == "done", 300, "the run to finish")
    expected, _ = local_losses(config, 6)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert [h["attempts"] for h in status["history"]] == [1, 1, 2, 1, 1, 1]
    assert status["tickets"]["exactly_once_violations"] == []
    with sqlite3.connect(tmp_path / "run.db") as db:
        events = db.execute("SELECT kind, detail FROM events WHERE kind LIKE 'loss_scale%' ORDER BY id").fetchall()
        scales = dict(db.execute("SELECT step, scale FROM loss_scales WHERE attempt=0 OR step=2 AND attempt=1"
                                 " ORDER BY step, attempt").fetchall())
    b_id = next(w["id"] for w in status["workers"] if w["name"] == "b")
    lowered = [d for k, d in events if k == "loss_scale_lowered"]
    assert len(lowered) == 1 and "step 2 attempt 0" in lowered[0] and "2048" in lowered[0] and b_id in lowered[0]
    # 1024 for steps 0-1, then doubled after those two clean steps; step 2's first attempt ran
    # at 2048 and overflowed, its re-run at 1024; doubled after steps 2 and 3, and after 4 and 5.
    assert [k for k, _ in events] == ["loss_scale_raised", "loss_scale_lowered", "loss_scale_raised",
                                      "loss_scale_raised"]
    assert scales == {0: 1024.0, 1: 1024.0, 2: 1024.0, 3: 1024.0, 4: 2048.0, 5: 2048.0}  # step 2: its re-run's
    assert "an overflow (inf)" in (tmp_path / "worker-b.log").read_text()
