"""The chaos soak in the suite: a few seeds of faults, one after another, over a real 2 x 2 swarm.

Each seed runs the whole short run (local_swarm/chaos.py) while the soak SIGKILLs workers and
whole stages, SIGKILLs and restarts the coordinator, freezes workers past the heartbeat timeout
and kills a replica inside an averaging round; every worker is armed to die once mid-upload of
a checkpoint. The run must finish, count every micro-batch exactly once, keep every loss
finite, lose no worker to a crash and leave no orphan; its export must load in transformers.
`gptjt bench chaos` runs many more seeds.
"""

from __future__ import annotations

import math

import pytest

from local_swarm.chaos import ChaosSettings, ChaosSoak

SEEDS = (11, 12)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_run_survives_a_seeded_chaos_soak(seed, tmp_path):
    soak = ChaosSoak(tmp_path, ChaosSettings(seed=seed, steps=9, checkpoint_every=3, gap_s=(5.0, 9.0),
                                             fault_every_steps=2, max_faults=6, timeout_s=400.0))
    try:
        result = soak.run()
        assert result.failure == "", result.failure
        kinds = {f.kind for f in result.faults}
        assert len(result.faults) >= 4 and "kill_checkpoint" in kinds, result.faults
        assert result.completed and result.steps_closed == 9
        assert (result.tickets_lost, result.tickets_double, result.violations) == (0, 0, [])
        assert result.losses_finite
        assert result.crashes == [], "\n\n".join(result.crashes)
        assert result.orphans == []
        export = soak.export(tmp_path / "export")
    finally:
        soak.close()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in model.parameters())
