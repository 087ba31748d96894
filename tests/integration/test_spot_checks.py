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


def _swarm(tmp_path, swarms) -> Swarm:
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=STEPS, global_batch=8, replicas_per_stage=2,
                                       start_with_replicas=2, extra=VERIFY))
    swarms.append(swarm)
    swarm.start_coordinator()
    return swarm


def _checks(status: dict) -> dict:
    return {k: v for k, v in status["verification"].items() if k.startswith("spot_")}


def test_a_lying_replica_is_named_by_the_checks_of_its_lies_and_honest_ones_never_are(tmp_path, swarms):
    """Honest replicas run different thread counts (1 and 2): their checks of each other must
    still agree every time; the liar's checks from its first lie on disagree."""
    swarm = _swarm(tmp_path, swarms)
    for i, threads in enumerate((1, 2, 1)):
        swarm.start_worker(f"w{i}", threads=threads).wait_for("joined", 120)
    swarm.start_worker("liar", threads=2, env={"GPTJT_FAULTS": "lie-noise@1"}).wait_for("joined", 120)
    status = swarm.wait(lambda s: s["phase"] == "done", 300, "the run to finish")
    liar = next(w["id"] for w in status["workers"] if w["name"] == "liar")
    counts = _checks(status)
    # each worker's first two micro-batches, then half of the rest; answered or let go stale
    assert counts["spot_checks"] >= 8 and counts["spot_disagree"] >= 1, counts
    assert counts["spot_agree"] + counts["spot_disagree"] + counts["spot_unchecked"] + counts["spot_stale"] <= \
        counts["spot_checks"]
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
    steps = 6
    config = swarm_toml(tmp_path, steps=steps, num_stages=1, global_batch=6, replicas_per_stage=3,
                        start_with_replicas=3, extra="[verify]\nsample_rate = 1.0\n")
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
