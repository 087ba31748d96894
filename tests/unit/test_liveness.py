"""Liveness: every stuck phase gets a cause and a remedy (the pure rules, then the ledger applying them)."""

from __future__ import annotations

import json

from coordinator.liveness import DROP_WORKERS, REDUCE_REPLICAS, RESTART_STEP, Limits, PhaseFacts, judge
from coordinator.scheduler import plan_stages
from coordinator.ledger import RunLedger
from tests.unit.test_ledger import Clock, commit_all, make, make_replicated, ready_swarm, replicated_swarm
import pytest

from tests.conftest import at

pytestmark = pytest.mark.usefixtures("both_ledger_backends")  # SQLite and PostgreSQL

LIMITS = Limits(phase_timeout_s=100.0, averaging_timeout_s=30.0, max_stall_restarts=2, max_averaging_restarts=2)
MEMBERS = {0: ["a", "b"], 1: ["c", "d"]}


def facts(phase: str, age: float, **kw) -> PhaseFacts:
    return PhaseFacts(phase, age, kw.pop("idle", age), kw.pop("paused", False), MEMBERS, kw.pop("reported", set()),
                      **kw)


# -- the rules -------------------------------------------------------------------------------
def test_nothing_is_stuck_within_its_deadline():
    assert judge(facts("open", 99.0, leases={"a": 1}), LIMITS) is None
    assert judge(facts("accumulated", 99.0), LIMITS) is None
    assert judge(facts("averaging", 29.0), LIMITS) is None
    assert judge(facts("waiting", 1e9), LIMITS) is None  # waiting for workers: no remedy hastens it


def test_an_open_step_without_commits_restarts_then_drops_the_lease_holders():
    stall = judge(facts("open", 500.0, idle=101.0, leases={"a": 2, "b": 0}), LIMITS)
    assert stall.remedy == RESTART_STEP and "no micro-batch committed for 101 s (a holds 2)" in stall.cause
    stall = judge(facts("open", 500.0, idle=101.0, leases={"a": 2}, restarts=2), LIMITS)
    assert stall.remedy == DROP_WORKERS and stall.workers == ("a",)
    # a paused run commits nothing on purpose; progress, not age, is what counts
    assert judge(facts("open", 500.0, idle=101.0, paused=True), LIMITS) is None
    assert judge(facts("open", 500.0, idle=50.0, leases={"a": 2}), LIMITS) is None


def test_silent_members_are_dropped_after_the_phase_deadline():
    stall = judge(facts("applying", 101.0, reported={"a", "b", "c"}), LIMITS)
    assert stall.remedy == DROP_WORKERS and stall.workers == ("d",)
    assert "d sent no applied update within 100 s" in stall.cause
    stall = judge(facts("accumulated", 101.0, reported={"a", "c"}), LIMITS)
    assert stall.workers == ("b", "d") and "gradient norm" in stall.cause
    assert judge(facts("applying", 101.0, reported={"a", "b", "c", "d"}), LIMITS) is None


def test_averaging_restarts_a_bounded_number_of_times_then_reduces_the_stuck_stage():
    causes = {"c": "no group (3 round(s))"}
    stall = judge(facts("averaging", 31.0, reported={"a", "b"}, causes=causes), LIMITS)
    assert stall.remedy == RESTART_STEP and stall.stages == (1,)
    assert "stage(s) 1 did not finish averaging within 30 s (c: no group (3 round(s)))" in stall.cause
    stall = judge(facts("averaging", 31.0, reported={"a", "b"}, causes=causes, restarts=2), LIMITS)
    assert stall.remedy == REDUCE_REPLICAS and stall.stages == (1,)


def test_a_replica_stranded_by_a_round_its_peers_finished_restarts_the_step_at_once():
    causes = {"c": "partial round (1 round(s))"}
    stall = judge(facts("averaging", 2.0, reported={"a", "b", "d"}, causes=causes, stranded={"c"}), LIMITS)
    assert stall.remedy == RESTART_STEP and stall.stages == (1,)
    assert "c's round failed after the other replica(s) had their sum" in stall.cause
    stall = judge(facts("averaging", 2.0, reported={"a", "b", "d"}, causes=causes, stranded={"c"}, restarts=2),
                  LIMITS)
    assert stall.remedy == REDUCE_REPLICAS and stall.stages == (1,)
    # once it has its sum after all (a late report), nothing is stuck before the deadline
    assert judge(facts("averaging", 2.0, reported={"a", "b", "c", "d"}, stranded={"c"}), LIMITS) is None


# -- the ledger applying them ----------------------------------------------------------------
def test_a_member_that_never_applies_is_dropped_and_named(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock)
    ledger.run.coordinator.phase_timeout_s = 60.0
    ids = ready_swarm(ledger, 2)
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        ledger.commit(ids[0], t.id, t.attempt, 1.0, 128)
    for w in ids:
        ledger.report(w, 0, 0, "contribution", 4.0, 2)
    assert ledger.phase == "applying"
    ledger.report(ids[0], 0, 0, "applied")
    clock.t += 61.0
    for w in ids:  # both heartbeat: alive, but ids[1] never reports
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 0)
    ledger.reap()
    events = ledger.status()["events"]
    stuck = [e["detail"] for e in events if e["kind"] == "step_stuck"]
    assert len(stuck) == 1 and f"{ids[1]} sent no applied update" in stuck[0] and "dropping" in stuck[0]
    assert ledger.worker(ids[1])["state"] == "dead"
    assert ledger.status()["liveness"]["last_stall"]["phase"] == "applying"


def test_an_open_step_that_never_progresses_is_restarted(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock)
    ledger.run.coordinator.phase_timeout_s = 60.0
    ids = ready_swarm(ledger, 2)
    ledger.lease(ids[0], 1)  # leased, never committed (a downstream call that hangs)
    clock.t += 61.0
    for w in ids:
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 0)
    ledger.reap()
    assert ledger.attempt == 1 and ledger.phase == "open"
    assert ledger.status()["liveness"]["stall_restarts"] == {"open": 1}
    kinds = [e["kind"] for e in ledger.status()["events"]]
    assert "step_stuck" in kinds and "step_restarted" in kinds


def test_averaging_that_keeps_failing_falls_back_to_one_replica_and_holds_the_other_out(tmp_path):
    clock = Clock()
    ledger = make_replicated(tmp_path, clock=clock)
    ledger.run.averaging.max_restarts = 1
    ledger.run.averaging.fallback_steps = 2
    by_stage = replicated_swarm(ledger)
    members = [*by_stage[0], *by_stage[1]]

    def reach_averaging_and_fail() -> None:
        assert commit_all(ledger, by_stage[0]) == 4
        step, attempt = ledger.step, ledger.attempt
        for w in members:
            assert ledger.report(w, step, attempt, "contribution", 4.0, 2)
        assert ledger.phase == "averaging"
        for w in by_stage[0]:  # stage 0 averages; stage 1's round never forms
            assert ledger.report(w, step, attempt, "averaged", 16.0, group_weight=4.0)
        assert ledger.averaging_failed(by_stage[1][0], step, attempt, "AllreduceException: could not find a group")
        assert ledger.averaging_failed(by_stage[1][0], step, attempt, "AllreduceException: could not find a group")
        clock.t += 3 * ledger.run.averaging.timeout_s + 1
        for w in members:
            if ledger.worker(w)["stage"] >= 0:
                ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, step)
        ledger.reap()

    reach_averaging_and_fail()
    assert ledger.attempt == 1 and ledger.phase == "open"  # restart 1 of 1
    failed = [e for e in ledger.status()["events"] if e["kind"] == "averaging_failed"]
    assert len(failed) == 1 and "could not find a group" in failed[0]["detail"]  # once per replica and attempt
    stuck = next(e for e in ledger.status()["events"] if e["kind"] == "step_stuck")
    assert "stage(s) 1 did not finish averaging" in stuck["detail"] and "could not find a group (2 round(s))" \
        in stuck["detail"]

    reach_averaging_and_fail()
    kept, held = sorted(by_stage[1])
    assert ledger.status()["stages"][1]["members"] == [kept]
    assert ledger.held_out() == {held: 2}
    assert ledger.worker(held)["stage"] == -1 and ledger.worker(held)["state"] == "standby"
    assert "replicas_reduced" in [e["kind"] for e in ledger.status()["events"]]
    # the held replica is not given the stage back while the hold lasts, even though it is short
    ledger.heartbeat(held, "standby", {}, -1, -1)
    assert ledger.worker(held)["stage"] == -1
    # the step now closes without a round in stage 1 ...
    assert ledger.phase == "open" and ledger.attempt == 2
    assert commit_all(ledger, by_stage[0]) == 4
    for w in [*by_stage[0], kept]:
        assert ledger.report(w, 0, 2, "contribution", 4.0, 2)
    for w in by_stage[0]:
        assert ledger.report(w, 0, 2, "averaged", 16.0, group_weight=4.0)
    assert ledger.report(kept, 0, 2, "averaged", 4.0, group_weight=4.0)
    for w in [*by_stage[0], kept]:
        assert ledger.report(w, 0, 2, "applied", digest="same")
    assert ledger.step == 1
    # ... and once the hold has ended (at step 2), the replica takes its stage again
    ledger.heartbeat(kept, "ready", {}, ledger.restore_epoch, 1)
    for w in by_stage[0]:
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 1)
    assert commit_all(ledger, by_stage[0]) == 4
    for w in [*by_stage[0], kept]:
        assert ledger.report(w, 1, ledger.attempt, "contribution", 4.0, 2)
    for w in [*by_stage[0], kept]:
        assert ledger.report(w, 1, ledger.attempt, "averaged", 16.0 if w in by_stage[0] else 4.0,
                             group_weight=4.0)
    for w in [*by_stage[0], kept]:
        assert ledger.report(w, 1, ledger.attempt, "applied", digest="same")
    assert ledger.step == 2 and ledger.held_out() == {}
    assert ledger.worker(held)["stage"] == 1


def test_a_round_failed_after_the_other_replica_summed_restarts_the_step_without_waiting(tmp_path):
    clock = Clock()
    ledger = make_replicated(tmp_path, clock=clock)
    by_stage = replicated_swarm(ledger)
    members = [*by_stage[0], *by_stage[1]]
    assert commit_all(ledger, by_stage[0]) == 4
    for w in members:
        assert ledger.report(w, 0, 0, "contribution", 4.0, 2)
    for w in by_stage[0]:
        assert ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    first, second = by_stage[1]
    # a failure while the other replica is still rounding is retried: no stall before the deadline
    assert ledger.averaging_failed(first, 0, 0, "AllreduceException: could not find a group")
    ledger.reap()
    assert (ledger.attempt, ledger.phase) == (0, "averaging")
    # the other replica finished the round this one lost parts of: it never rounds again
    assert ledger.report(second, 0, 0, "averaged", 16.0, group_weight=4.0)
    assert ledger.averaging_failed(first, 0, 0, "partial round: hivemind dropped a peer's parts")
    clock.t += 1.0  # far inside the 3 x averaging.timeout_s deadline
    ledger.reap()
    assert (ledger.attempt, ledger.phase) == (1, "open")
    stuck = next(e["detail"] for e in ledger.status()["events"] if e["kind"] == "step_stuck")
    assert f"{first}'s round failed after the other replica(s) had their sum" in stuck
    assert ledger.status()["liveness"]["stall_restarts"] == {"averaging": 1}


def test_workers_dht_peers_bootstrap_joiners_own_stage_first(tmp_path):
    ledger = make_replicated(tmp_path)
    by_stage = replicated_swarm(ledger)
    for i, w in enumerate([*by_stage[0], *by_stage[1]]):
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 0, dht_maddrs=[f"/ip4/127.0.0.1/tcp/{100 + i}/p2p/X"])
    me = by_stage[1][0]
    peers = ledger.worker_dht_peers(me)
    assert len(peers) == 3 and peers[0] == "/ip4/127.0.0.1/tcp/103/p2p/X"  # the other stage-1 replica first
    ledger.leave(by_stage[0][0])
    assert "/ip4/127.0.0.1/tcp/100/p2p/X" not in ledger.worker_dht_peers(me)  # the dead are not handed out


def test_a_ledger_written_before_dht_peers_were_kept_gains_the_column(tmp_path):
    ledger = make(tmp_path)
    ledger.db.execute("ALTER TABLE workers DROP COLUMN dht_maddrs")  # as an older version wrote it
    ledger.db.close()
    ledger = RunLedger(at(tmp_path), ledger.run, plan_stages(4, 2), Clock())
    worker = ledger.join("w", "h:1", {})["id"]
    assert ledger.heartbeat(worker, "ready", {}, 0, 0, dht_maddrs=["/ip4/1.2.3.4/tcp/5/p2p/Y"])
    assert json.loads(ledger.worker(worker)["dht_maddrs"]) == ["/ip4/1.2.3.4/tcp/5/p2p/Y"]


def test_workers_long_gone_and_the_oldest_events_are_let_go_with_their_counts(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock)
    ledger.run.coordinator.prune_after_s = 100.0
    ids = ready_swarm(ledger, 3)
    ledger.leave(ids[2])
    counts = ledger.events.counts()
    clock.t += 50.0
    assert ledger.prune() == (0, 0)  # left 50 s ago: kept; fewer events than max_events
    ledger.run.coordinator.max_events = 5  # (the config's floor is 1000; the rule is what is tested)
    clock.t += 51.0
    workers, events = ledger.prune()
    assert workers == 1 and ledger.worker(ids[2]) is None and ledger.worker(ids[0]) is not None
    assert events == sum(counts.values()) - 5 and ledger.events.counts() == counts  # every event still counted
    assert len(ledger.events.recent(100)) == 5
