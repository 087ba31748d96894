"""bench churn's simulation against a live loopback swarm: the same scripted churn, the same run
config, and the two ledgers agree on the sequence of plans the steps ran on and on the rollbacks
(bench/churn_script.py). The simulation drives the real ledger, scheduler and placement code; the
swarm runs them in a coordinator process with real workers (simulated devices pace their compute).

The script: two slow workers train (b a little faster than a); a 5x faster one joins at step 1,
so a better plan waits for the next complete checkpoint (every 3 steps) and moves it in; one
step after it took its stage it is SIGKILLed, so the run rolls back to that checkpoint and goes
on with the two slow ones."""

from __future__ import annotations

import sqlite3

import pytest

from bench.churn_script import ScriptedSimulation, ScriptedWorker, agreement_record
from tests.swarm import Swarm, swarm_toml

SCRIPT = [ScriptedWorker("a", "0.002:24"), ScriptedWorker("b", "0.0025:24"),
          ScriptedWorker("fast", "0.01:24", join_at_step=1, killed_after_held_steps=1)]


def _config(tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    return swarm_toml(tmp, steps=10, checkpoint_every=3, placement="cost-model", min_workers=2, timeout_s=5.0)


def _live(tmp) -> dict:
    """The script acted out on loopback, its triggers read from the coordinator's status."""
    swarm = Swarm(tmp, _config(tmp))
    procs, held_since = {}, {}
    try:
        swarm.start_coordinator()
        for w in SCRIPT:
            if w.join_at_step == 0:  # in order: the ledger orders workers by join
                procs[w.name] = swarm.start_worker(w.name, None, "--simulate-device", w.device)
                procs[w.name].wait_for("gptjt-worker: joined")

        def act(status: dict) -> bool:
            step, names = status["step"], {w["id"]: w["name"] for w in status["workers"]}
            holding = {names.get(i) for s in status["stages"] for i in s["workers"]}
            for w in SCRIPT:
                if w.name not in procs and step >= w.join_at_step:
                    procs[w.name] = swarm.start_worker(w.name, None, "--simulate-device", w.device)
                if w.killed_after_held_steps is None or w.name not in procs or procs[w.name].p.poll() is not None:
                    continue
                if w.name in holding:
                    held_since.setdefault(w.name, step)
                if w.name in held_since and step >= held_since[w.name] + w.killed_after_held_steps:
                    swarm.kill(procs[w.name])
            return status["phase"] == "done"

        swarm.wait(act, timeout=300, what="the scripted run to finish", poll_s=0.1)
    finally:
        swarm.close()
    with sqlite3.connect(f"file:{swarm.ledger_path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return agreement_record(db)


@pytest.mark.timeout(420)
def test_the_simulator_and_a_loopback_swarm_agree_on_plans_and_rollbacks(tmp_path):
    sim = ScriptedSimulation.of_run_file(_config(tmp_path / "sim-config"), SCRIPT, tmp_path)
    sim.run_sim()
    simulated = agreement_record(sim.ledger.db)
    live = _live(tmp_path / "live")
    print("simulated:", simulated, "\nlive:", live)
    # what the script makes happen, in both
    assert len(simulated["plans"]) == 3 and simulated["plans"][0] == simulated["plans"][2]
    assert any("fast" in names for _, _, names in simulated["plans"][1])
    assert simulated["rollbacks"] == [1] and simulated["dead"] == ["fast"]
    assert live == simulated
