"""Liveness under faults, one defect at a time, with real processes (the chaos soak found each of them).

- a re-plan that moves a stage's layer range rebuilds its replicas' averagers;
- the run's DHT stays one network across coordinator restarts, and a killed coordinator's DHT
  process and p2pd daemon die with it;
- averaging that keeps failing is reported with its cause and ends in a fallback, not forever;
- a replica frozen past the heartbeat timeout comes back as a new worker, never as a ghost.
"""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest

from local_swarm.chaos import _session_processes
from tests.swarm import Swarm, local_losses, swarm_toml

AVERAGING = """
[averaging]
compression = "none"
timeout_s = {timeout}
matchmaking_s = 1.0
max_restarts = 1
"""


def replicated(tmp, swarms: list, steps: int = 3, timeout: float = 10.0, **kw) -> Swarm:
    config = swarm_toml(tmp, steps=steps, global_batch=8, micro_batch=2, seq_len=32, replicas_per_stage=2,
                        start_with_replicas=2, extra=AVERAGING.format(timeout=timeout), **kw)
    swarm = Swarm(tmp, config)
    swarms.append(swarm)
    return swarm


def done(s: dict) -> bool:
    return s["phase"] == "done"


def events(swarm: Swarm, kind: str) -> list[str]:
    """Every event of `kind` in the run's ledger, oldest first (the status carries only the newest)."""
    db = sqlite3.connect(f"file:{swarm.ledger_path}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT detail FROM events WHERE kind=? ORDER BY id", (kind,))]
    finally:
        db.close()


def test_a_replan_before_the_first_step_rebuilds_the_averagers(tmp_path, swarms):
    """The first worker holds stage 0 of the even split (layers 0-2) and has built its averager
    when the second joins; the cost model then gives stage 0 layers 0-3 (the LM head is the heavy
    part of the tiny model). The first worker must build a new averager: with the old one (the
    old range's tensors, the old group key) stage 0's replicas never met and step 0 restarted
    forever."""
    swarm = replicated(tmp_path, swarms, steps=2, placement="cost-model", min_workers=1)
    swarm.start_coordinator()
    first = swarm.start_worker("a", None, "--simulate-device", "0.004:24")
    swarm.wait(lambda s: [w["state"] for w in s["workers"]] == ["ready"] and s["plan"]["ranges"] == [[0, 2], [2, 4]],
               180, "the first worker ready on stage 0 of the even split")
    for n in "bcd":
        swarm.start_worker(n, None, "--simulate-device", "0.004:24")
    status = swarm.wait(done, 300, "the run to finish after the re-plan")
    assert status["plan"]["ranges"] != [[0, 2], [2, 4]]
    assert "a new averager for the new range" in first.text()
    assert status["tickets"]["exactly_once_violations"] == []
    assert all(len(h["stages"][s]["replicas"]) == 2 and h["stages"][s]["summed_micro_batches"] == 4
               for h in status["history"] for s in ("0", "1"))


def test_a_killed_coordinator_takes_its_dht_and_daemons_along(tmp_path, swarms):
    swarm = replicated(tmp_path, swarms)
    coordinator = swarm.start_coordinator()
    session = _session_processes(coordinator.p.pid)
    assert any("p2pd" in cmd for _, cmd in session), session  # the DHT's daemon runs in its session
    swarm.kill(coordinator, signal.SIGKILL)
    coordinator.p.wait(10)
    deadline = time.monotonic() + 5.0
    while (left := _session_processes(coordinator.p.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"orphans of the killed coordinator: {left}"


def test_replicas_that_joined_under_different_coordinators_average_together(tmp_path, swarms):
    """One replica of each stage joins, the coordinator is SIGKILLed and restarted, the other
    replicas join the new one: every replica must be in one DHT network (the restarted
    coordinator keeps its identity and port, and bootstraps from the workers' own peers)."""
    swarm = replicated(tmp_path, swarms, steps=3)
    coordinator = swarm.start_coordinator()
    for n in ("a", "b"):
        swarm.start_worker(n)
    swarm.wait(lambda s: len([w for w in s["workers"] if w["state"] == "ready"]) == 2, 180, "two ready workers")
    swarm.wait(lambda s: all(w["metrics"] for w in s["workers"]), 30, "heartbeats with the averagers' DHT peers")
    swarm.kill(coordinator, signal.SIGKILL)
    coordinator.p.wait(10)
    swarm.restart_coordinator()
    for n in ("c", "d"):
        swarm.start_worker(n)
    status = swarm.wait(done, 300, "the run to finish with replicas from both coordinators")
    assert all(len(h["stages"][s]["replicas"]) == 2 and h["stages"][s]["summed_micro_batches"] == 4
               for h in status["history"] for s in ("0", "1"))
    # Replicas in two DHT networks never find each other: every attempt fails and the run falls
    # back to one replica. A first round that hivemind cuts short (a partial round, a group not
    # found in time: CI saw one, and the retry averaged) is restarted like any other, not that.
    assert "replicas_reduced" not in status["event_counts"]
    assert status["event_counts"].get("step_stuck", 0) <= 1, status["event_counts"]
    expected, _ = local_losses(swarm.config, 3)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=1e-5)


def test_averaging_that_keeps_failing_is_named_and_falls_back_to_one_replica(tmp_path, swarms):
    """A stage-1 replica whose rounds can never succeed (isolate-averaging: its tag matches no one's):
    each replica reports why its rounds fail, the coordinator restarts the step once
    (averaging.max_restarts = 1), then runs stage 1 with one replica; the run finishes."""
    swarm = replicated(tmp_path, swarms, steps=3, timeout=3.0)
    swarm.start_coordinator()
    swarm.start_worker("a")
    swarm.start_worker("b")
    swarm.start_worker("c")
    swarm.wait(lambda s: len(s["workers"]) == 3, 60, "three workers joined")
    # Isolated from the first step. Armed at step 1 (as it was), a first round that hivemind cut
    # short as the fourth replica joined made step 0 restart (CI on 0724684) or, twice, take the
    # replica out (a run by hand) before the fault fired: the stalls asserted below were step 0's.
    swarm.start_worker("d", env={"GPTJT_FAULTS": "isolate-averaging@0"})
    status = swarm.wait(done, 300, "the run to finish despite the isolated replica")
    kinds = status["event_counts"]
    assert kinds.get("averaging_failed", 0) >= 2 and kinds.get("step_stuck", 0) >= 2
    assert kinds.get("replicas_reduced", 0) >= 1
    stuck = events(swarm, "step_stuck")
    # Why its rounds fail depends on hivemind's matchmaking: a group with the isolated replica in it
    # is refused (mixed step attempts), or no group forms at all (CI saw both); either is named.
    # The stage's stall is named one of two ways: no replica finished averaging in time, or one
    # ended its round with a sum and the other is stranded with nobody to average with (a full
    # CI-style run on 1d692da saw the second); either is this averaging failing, and either
    # restarts the step.
    assert "did not finish averaging" in stuck[0] or "had their sum, so nobody is left" in stuck[0], stuck[0]
    # The group's failure as hivemind reports it: refused (mixed attempts), none formed, or, when one
    # replica already had its sum, "Unable to run All-Reduce" (make test on 2f6eb6c saw that).
    assert any(cause in stuck[0] for cause in ("mixed step attempts", "could not find a group",
                                               "Unable to run All-Reduce")), stuck[0]
    assert "restarting the step (restart 1 of 1" in stuck[0] and "continue with one replica" in stuck[1]
    assert status["tickets"]["exactly_once_violations"] == []
    assert status["liveness"]["last_stall"]["phase"] == "averaging"


def test_a_replica_frozen_past_the_timeout_comes_back_as_a_new_worker(tmp_path, swarms):
    """SIGSTOP a stage-1 replica while its stage averages, past the heartbeat timeout, then SIGCONT:
    it is declared dead, its stage goes on with the other replica (which refuses any round with
    the frozen one's averager, test_averaging.py), and it joins again under a new id (or, if the
    run finished meanwhile, is told so and exits); nothing is counted twice and the run stays on
    train-local's curve."""
    swarm = replicated(tmp_path, swarms, steps=6, timeout_s=3.0)
    swarm.start_coordinator()
    procs = {n: swarm.start_worker(n) for n in "abcd"}
    status = swarm.wait(lambda s: s["step"] >= 1 and s["phase"] == "averaging", 240, "a step averaging",
                        poll_s=0.05)
    by_id = {w["id"]: w["name"] for w in status["workers"]}
    name = by_id[sorted(status["stages"][1]["members"])[-1]]
    first_id = next(i for i, n in by_id.items() if n == name)
    frozen = procs[name]
    frozen.kill(signal.SIGSTOP)
    swarm.wait(lambda s: any(w["id"] == first_id and w["state"] == "dead" for w in s["workers"]), 30,
               "the frozen replica declared dead")
    frozen.kill(signal.SIGCONT)
    frozen.wait_for(f"{first_id} was declared dead by the coordinator; joining again", 60)
    status = swarm.wait(done, 300, "the run to finish")
    deadline = time.monotonic() + 60  # it joins again 2 s after it learns it is dead
    while frozen.alive and not [w for w in swarm.status()["workers"] if w["name"] == name and w["id"] != first_id] \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    again = [w for w in swarm.status()["workers"] if w["name"] == name and w["id"] != first_id]
    if again:  # it joined again as a new worker, and was never taken for the old one
        assert again[0]["state"] != "dead" and again[0]["id"] != first_id
    else:  # the run had finished: it was told so and left with the join refusal's exit status
        assert frozen.p.wait(10) == 3 and "the run is finished" in frozen.text()
    assert status["tickets"]["exactly_once_violations"] == [] and status["tickets"]["double"] == 0
    # Its gradient share of the step it froze in is estimated from the other replica (as for any
    # replica lost mid-step), unless its round had finished: on the curve, not exactly on it.
    expected, _ = local_losses(swarm.config, 6)
    got = [h["loss"] for h in status["history"]]
    assert got[:2] == pytest.approx(expected[:2], rel=1e-5)  # computed before the freeze took effect
    assert got == pytest.approx(expected, rel=0.05)
