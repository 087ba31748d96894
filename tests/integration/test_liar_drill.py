"""A lying worker through the fault drill (GPTJT_FAULTS lie-*, worker/lies.py), real processes on
loopback: its lie is what the next stage receives, and nothing stops the run (a stage with one
replica and no standby is not spot-checked: test_spot_checks.py has replicas, or standbys,
recompute its work). Every stage commits to each micro-batch and
the coordinator checks that neighbours agree on the bytes between them; a liar commits to what it
sent, its lie, so only a recomputation can catch it."""

from __future__ import annotations

import pytest

from gptjt_core.config import load_run_config
from tests.swarm import Swarm, local_losses, swarm_toml

STEPS, LIE_FROM = 4, 2


def test_a_stage_0_that_zeroes_its_output_from_step_2_changes_the_losses_from_step_2_on(tmp_path, swarms):
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=STEPS))
    swarms.append(swarm)
    swarm.start_coordinator()
    # one at a time, so the liar takes stage 0 and the honest worker stage 1 (the loss)
    swarm.start_worker("liar", env={"GPTJT_FAULTS": f"lie-zero@{LIE_FROM}"}).wait_for("joined", 120)
    swarm.start_worker("honest").wait_for("joined", 120)
    status = swarm.wait(lambda s: s["phase"] == "done", 240, "the run to finish")
    assert {w["name"]: w["stage"] for w in status["workers"]} == {"liar": 0, "honest": 1}

    honest, _ = local_losses(swarm.config, STEPS)  # train-local: what an honest swarm reproduces (test_swarm.py)
    got = [h["loss"] for h in status["history"]]
    assert got[:LIE_FROM] == pytest.approx(honest[:LIE_FROM], rel=1e-6, abs=1e-6)  # honest before its step
    # from its step on, stage 1 computed its loss on zeros: off the honest curve by far more than the
    # 1e-6 an honest swarm keeps (the tiny random model's losses sit near ln(vocab), ~0.04 apart)
    for step in range(LIE_FROM, STEPS):
        assert abs(got[step] - honest[step]) > 1e-3, (step, got, honest)
    assert status["tickets"]["exactly_once_violations"] == [] and status["step"] == STEPS
    assert status["verification"]["mismatches"] == 0  # it committed to its lie: the chain agrees
    log = (tmp_path / "worker-liar.log").read_text()
    assert log.count("fault injection: lying (zero) from step 2 on this stage's forward output") == 1, log[-2000:]
    assert "fault injection" not in (tmp_path / "worker-honest.log").read_text()


def test_an_honest_two_stage_swarm_commits_to_every_micro_batch_and_its_chain_agrees(tmp_path, swarms):
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=STEPS))
    swarms.append(swarm)
    swarm.start_coordinator()
    for name in ("a", "b"):
        swarm.start_worker(name).wait_for("joined", 120)
    status = swarm.wait(lambda s: s["phase"] == "done", 240, "the run to finish")
    assert sorted(w["stage"] for w in status["workers"]) == [0, 1]
    tickets = status["tickets"]["committed"]
    assert tickets == STEPS * load_run_config(swarm.config).train.micro_batches_per_step
    # one commitment per ticket and stage; one link (stage 0 -> 1) checked per ticket; all agree
    chain = {k: status["verification"][k] for k in ("commitments", "checks", "mismatches")}
    assert chain == {"commitments": 2 * tickets, "checks": tickets, "mismatches": 0}
    assert status["verification"]["spot_checks"] == 0  # no replicas: nobody to recompute (test_spot_checks.py)
    assert status["event_counts"].get("commitment_mismatch", 0) == 0
