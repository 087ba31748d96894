"""Spot checks on loopback, real processes: a 2-stage swarm with 2 replicas per stage, where each
replica recomputes micro-batches of the other from its evidence (worker/spot_check.py) and the
coordinator judges (coordinator/ledger/spot_checks.py). Honest replicas with different thread
counts never disagree; a replica that lies (the fault drill's lie-noise) is named by every check
of its lies; with a third replica, the liar is quarantined and the run re-done without it."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest

from tests.swarm import BIN, Swarm, local_losses, swarm_toml

STEPS = 4
VERIFY = "[verify]\nsample_rate = 0.5\nfirst_checks = 2\n"


def _swarm(tmp_path, swarms, verify: str = VERIFY) -> Swarm:
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=STEPS, global_batch=8, replicas_per_stage=2,
                                       start_with_replicas=2, extra=verify))
    swarms.append(swarm)
    swarm.start_coordinator()
    return swarm


def _checks(status: dict) -> dict:
    return {k: v for k, v in status["verification"].items() if k.startswith("spot_")}


def test_a_lying_replica_is_named_by_the_checks_of_its_lies_and_honest_ones_never_are(tmp_path, swarms):
    """Honest replicas run different thread counts (1 and 2): their checks of each other must
    still agree every time; the liar's checks from its first lie on disagree. Every micro-batch
    is checked: at a rate of 0.5 the ~6 micro-batches the liar serves after its first lie all
    went unchecked in one full run (the draw is the OS's random source, by design)."""
    swarm = _swarm(tmp_path, swarms, "[verify]\nsample_rate = 1.0\nfirst_checks = 2\n")
    for i, threads in enumerate((1, 2, 1)):
        swarm.start_worker(f"w{i}", threads=threads).wait_for("joined", 120)
    swarm.start_worker("liar", threads=2, env={"GPTJT_FAULTS": "lie-noise@1"}).wait_for("joined", 120)
    status = swarm.wait(lambda s: s["phase"] == "done", 300, "the run to finish")
    liar = next(w["id"] for w in status["workers"] if w["name"] == "liar")
    counts = _checks(status)
    # every micro-batch is drawn; each check is answered or let go stale
    assert counts["spot_checks"] >= 8 and counts["spot_disagree"] >= 1, counts
    assert counts["spot_agree"] + counts["spot_disagree"] + counts["spot_unchecked"] + counts["spot_stale"] <= \
        counts["spot_checks"]
    assert 0 < counts["spot_verified_fraction"] <= 1 and counts["spot_verified_tokens"] > 0, counts
    with sqlite3.connect(f"file:{tmp_path / 'run.db'}?mode=ro", uri=True) as db:
        failed = [r[0] for r in db.execute("SELECT detail FROM events WHERE kind='spot_check_failed'")]
        verdicts = db.execute("SELECT worker, step, verdict FROM checks WHERE kind='recompute'").fetchall()
    assert len(failed) == counts["spot_disagree"]
    # the checked worker is named first ("<id>'s work recomputed by <verifier>"): always the liar
    assert all(f"{liar}'s work recomputed by" in d and "relative error" in d for d in failed), failed
    honest = [v for w, step, v in verdicts if w != liar or step == 0]  # the liar was honest at step 0
    assert "agree" in honest and set(honest) <= {"agree", "unchecked", "stale"}, verdicts
    logs = "".join((tmp_path / f"worker-{n}.log").read_text() for n in ("w0", "w1", "w2", "liar"))
    assert logs.count("): agree") == counts["spot_agree"]  # each verifier logged each answer


def test_a_liar_out_voted_by_two_replicas_is_quarantined_and_the_run_ends_on_the_honest_curve(tmp_path, swarms):
    """One stage (the whole tiny model) with three replicas, so a dispute has a third member to
    settle it. The liar falsifies the loss it reports from step 1 on; once two replicas recompute
    one of its micro-batches and disagree with it, it is quarantined (its session ends; its join
    under the same name is refused), the run rolls back to the initial weights (no checkpoint
    predates its first step) and re-runs without it: the losses are train-local's."""
    # One micro-batch in flight a worker, so each of the three takes one of a step's three: with
    # two in flight each, the two honest workers leased all three in steps 1-4 on loaded cores,
    # the liar lied first at step 5, and the run ended before the dispute did (CI 2026-12-05).
    steps = 6
    config = swarm_toml(tmp_path, steps=steps, num_stages=1, global_batch=6, replicas_per_stage=3,
                        start_with_replicas=3, max_in_flight=1, extra="[verify]\nsample_rate = 1.0\n")
    swarm = Swarm(tmp_path, config)
    swarms.append(swarm)
    swarm.start_coordinator()
    for i in range(2):
        swarm.start_worker(f"w{i}").wait_for("joined", 120)
    liar = swarm.start_worker("liar", env={"GPTJT_FAULTS": "lie-noise@1", "GPTJT_LIE_NOISE": "0.5"})
    status = swarm.wait(lambda s: s["phase"] == "done", 400, "the run to finish")
    states = {w["name"]: w["state"] for w in status["workers"]}
    assert "quarantined" in states.values() and status["verification"]["quarantined"] == 1, states
    liar_id = next(w["id"] for w in status["workers"] if w["name"] == "liar" and w["state"] == "quarantined")
    events = {e["kind"]: e["detail"] for e in status["events"]}
    assert liar_id in events["worker_quarantined"] and "disagreed too" in events["worker_quarantined"]
    assert f"{liar_id} quarantined" in events["rolled_back"]
    liar.wait_for("is quarantined", 60)  # its join again was refused, saying why
    honest, _ = local_losses(swarm.config, steps)
    got = [h["loss"] for h in status["history"]]
    assert got == pytest.approx(honest, rel=1e-5, abs=1e-6), (got, honest)
    lifted = subprocess.run([str(BIN / "gptjt"), "lift", liar_id, "--coordinator", swarm.address, "--admin-token",
                             swarm.admin_token], capture_output=True, text=True, timeout=60)
    assert lifted.returncode == 0 and f"lifted the quarantine of worker {liar_id} (liar)" in lifted.stdout, lifted
    assert swarm.status()["verification"]["quarantined"] == 0


@pytest.mark.parametrize("lie, liar_stage", [("lie-noise", 1), ("lie-stale", 0), ("lie-scale-grad", 1)])
def test_stages_with_one_replica_are_checked_by_standbys_and_a_liar_among_them_is_quarantined(
        lie, liar_stage, tmp_path, swarms):
    """Two stages, one replica each, and two standbys that check them with weights from the
    checkpoint store (every step is stored, so every micro-batch is checkable; step 0's weights
    come from the model source). One stage lies from step 1 on: noise on the loss the last stage
    reports, stage 0 replaying an earlier micro-batch's activations, or the last stage scaling
    the gradient it sends back. Both standbys recompute one of its lies and disagree: it is
    quarantined, a standby takes its stage, and the run re-done from the initial weights ends on
    train-local's losses."""
    steps = 5
    config = swarm_toml(tmp_path, steps=steps, global_batch=4, checkpoint_every=1, min_workers=4,
                        extra="[verify]\nsample_rate = 1.0\n")  # the run starts once the standbys are in
    swarm = Swarm(tmp_path, config)
    swarms.append(swarm)
    swarm.start_coordinator()
    liar_env = {"GPTJT_FAULTS": f"{lie}@1", "GPTJT_LIE_NOISE": "0.5"}
    for stage in range(2):  # one at a time: the first to join takes stage 0
        name, env = ("liar", liar_env) if stage == liar_stage else ("w0", None)
        swarm.start_worker(name, env=env).wait_for("joined", 120)
    for i in range(2):
        swarm.start_worker(f"s{i}").wait_for("joined", 120)
    status = swarm.wait(lambda s: s["phase"] == "done", 400, "the run to finish")
    states = {w["name"]: w["state"] for w in status["workers"]}
    assert status["verification"]["quarantined"] == 1 and "quarantined" in states.values(), states
    liar_id = next(w["id"] for w in status["workers"] if w["name"] == "liar" and w["state"] == "quarantined")
    events = {e["kind"]: e["detail"] for e in status["events"]}
    assert liar_id in events["worker_quarantined"] and "disagreed too" in events["worker_quarantined"]
    assert f"stage {liar_stage}" in events["worker_quarantined"]
    with sqlite3.connect(f"file:{tmp_path / 'run.db'}?mode=ro", uri=True) as db:
        verdicts = db.execute("SELECT worker, weights, verdict FROM checks WHERE kind='recompute'").fetchall()
    # every check went to a standby with stored (or step 0's source) weights; honest work always agreed
    assert {w for _, w, _ in verdicts} <= {"store", "source"} and any(w == "store" for _, w, _ in verdicts)
    honest = [v for worker, _, v in verdicts if worker != liar_id]  # (pending: drawn as the run ended)
    assert "agree" in honest and set(honest) <= {"agree", "unchecked", "stale", "pending"}, verdicts
    logs = "".join((tmp_path / f"worker-{n}.log").read_text() for n in ("s0", "s1"))
    assert "from the checkpoint store to spot-check it" in logs
    honest_losses, _ = local_losses(swarm.config, steps)
    got = [h["loss"] for h in status["history"]]
    assert got == pytest.approx(honest_losses, rel=1e-5, abs=1e-6), (got, honest_losses)
