"""Data-parallel replicas with real processes on loopback: 2 stages x 2 replicas, hivemind averaging."""

from __future__ import annotations

import math
import signal
import sqlite3
import time

import pytest

from tests.swarm import Swarm, local_losses, swarm_toml

AVERAGING = """
[averaging]
compression = "none"
timeout_s = 10.0
matchmaking_s = {matchmaking_s}
"""


def replicated(swarms: list, tmp, replicas: int = 2, steps: int = 6, timeout_s: float = 3.0,
               start_with: int = 2, matchmaking_s: float = 1.0) -> Swarm:
    # 4 micro-batches per step, so both replicas of every stage get work
    config = swarm_toml(tmp, steps=steps, global_batch=8, micro_batch=2, seq_len=32, timeout_s=timeout_s,
                        replicas_per_stage=replicas, start_with_replicas=start_with,
                        extra=AVERAGING.format(matchmaking_s=matchmaking_s))
    swarm = Swarm(tmp, config)
    swarms.append(swarm)
    swarm.start_coordinator()
    return swarm


def losses(status: dict) -> list[float]:
    return [h["loss"] for h in status["history"]]


def replica_digests(status: dict) -> list[dict[str, dict[str, str]]]:
    """Per closed step, per stage: worker -> parameter digest after the update."""
    return [{stage: d["digests"] for stage, d in h["stages"].items()} for h in status["history"]]


def test_two_by_two_matches_train_local_and_a_joiner_is_bit_identical(tmp_path, swarms):
    # Five workers on two cores: a joiner's heartbeats once paused 3 s right after it loaded (seen
    # 2026-12-02, with spot checks on) and it was declared dead; this test is about bit-identical
    # state, not liveness (the faults test below keeps the 3 s timeout).
    # Matchmaking: until 2026-12-06 hivemind started a round with any 2 of 3 replicas once
    # matchmaking_s ran out; on loaded cores the joiner and one replica started without the third
    # at every attempt of the step, and the stage fell back to one replica, so the joiner took part
    # in no closed step. A round's group is now exactly the step's members (worker/averaging.py).
    swarm = replicated(swarms, tmp_path, replicas=3, steps=8, timeout_s=10.0)
    for name in "abcd":
        swarm.start_worker(name)
    status = swarm.wait(lambda s: s["step"] >= 1, 240, "a step with four workers")
    assert [len(s["members"]) for s in status["stages"]] == [2, 2]
    assert len(status["history"][0]["stages"]["0"]["replicas"]) == 2  # the first step waited for both
    # Paused until the joiner has loaded: on two loaded cores a worker took ~40 s to start and
    # the run closed its last step first (seen in CI 2026-12-04), so the joiner took part in none.
    swarm.operate("pause")
    swarm.start_worker("joiner")
    swarm.wait(lambda s: any(w["name"] == "joiner" and w["state"] == "ready" for w in s["workers"]), 240,
               "the joiner to load its stage")
    swarm.operate("resume")
    status = swarm.wait(lambda s: s["phase"] == "done", 300, "the run to finish")
    expected, _ = local_losses(swarm.config, 8)
    # float64 sums across replicas: equal to train-local up to float32 summation order
    assert losses(status) == pytest.approx(expected, rel=1e-5)
    assert status["tickets"]["exactly_once_violations"] == []
    joiner = next(w["id"] for w in status["workers"] if w["name"] == "joiner")
    took_part = 0
    for step in replica_digests(status):
        for stage, digests in step.items():
            assert len(set(digests.values())) == 1, f"stage {stage} replicas differ: {digests}"
            took_part += joiner in digests
    assert took_part >= 1, "the joiner never took part in a step"
    # A round that hivemind finishes only partly (a slow reducer on a loaded machine) makes the
    # replicas' sums disagree; the coordinator then re-runs the step, so that may appear here.
    assert "replicas_diverged" not in status["event_counts"]
    assert "fetched stage state" in (tmp_path / "worker-joiner.log").read_text()


def test_a_joiner_refuses_a_state_no_member_reported(tmp_path, swarms):
    """Both replicas in place hand out altered weights (lie-state: what FetchState sends has its
    weights x 1.1, not the state they train and report). A joiner must not load it: the copy's
    digest is none of those the stage's members reported after the last closed step, so it is
    refused at every try and the joiner takes part in no step, while the run trains on (the liars
    train honestly) to train-local's losses."""
    swarm = replicated(swarms, tmp_path, replicas=2, steps=4, timeout_s=10.0, start_with=1)
    for name in "ab":
        swarm.start_worker(name, env={"GPTJT_FAULTS": "lie-state@0"}).wait_for("joined", 120)
    swarm.wait(lambda s: s["step"] >= 1, 240, "a closed step")
    swarm.operate("pause")  # so the joiner's copy is made before the run ends (two loaded cores)
    swarm.start_worker("joiner")
    log = tmp_path / "worker-joiner.log"
    deadline = time.monotonic() + 240
    while "refusing the stage state" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the joiner did not refuse the altered state"
        time.sleep(1.0)
    swarm.operate("resume")
    status = swarm.wait(lambda s: s["phase"] == "done", 300, "the run to finish")
    text = log.read_text()
    assert "is none the stage's members reported" in text and "fetched stage state" not in text
    joiner = next(w["id"] for w in status["workers"] if w["name"] == "joiner")
    assert all(joiner not in digests for step in replica_digests(status) for digests in step.values())
    expected, _ = local_losses(swarm.config, 4)
    assert losses(status) == pytest.approx(expected, rel=1e-5)


def test_faults_poison_sigkill_mid_forward_and_death_mid_averaging(tmp_path, swarms):
    """One run, three faults: a replica sends a poisoned gradient at step 3; a stage-1 replica
    is SIGKILLed mid-step at step 4; a stage-0 replica kills itself inside the averaging round
    of step 5. The heartbeat timeout is 30 s, so the run can only keep moving because peers
    report the dead and the coordinator confirms it at once."""
    swarm = replicated(swarms, tmp_path, replicas=2, steps=7, timeout_s=30.0)
    faults = {"a": "poison@3", "c": "die-averaging@5"}
    procs = {}
    for name in "abcd":  # one at a time, so stages fill in this order: a 0, b 1, c 0, d 1
        procs[name] = swarm.start_worker(name, env={"GPTJT_FAULTS": faults.get(name, "")})
        procs[name].wait_for("joined", 120)
    status = swarm.wait(lambda s: s["step"] >= 4 and s["phase"] == "open", 300, "step 4 open")
    stage_of = {w["name"]: w["stage"] for w in status["workers"]}
    assert stage_of == {"a": 0, "b": 1, "c": 0, "d": 1}
    t_kill = time.monotonic()
    procs["d"].kill(signal.SIGKILL)
    swarm.wait(lambda s: s["step"] >= 5, 60, "the step after the kill to close")
    recovery = time.monotonic() - t_kill
    status = swarm.wait(lambda s: s["phase"] == "done", 300, "the run to finish")
    with sqlite3.connect(tmp_path / "run.db") as db:  # every event, not only the last 50 in the status
        poisoned = [d for (d,) in db.execute("SELECT detail FROM events WHERE kind='poisoned_update'")]
        step3_restarts = [d for (d,) in db.execute("SELECT detail FROM events WHERE kind='step_restarted'")
                          if d.startswith("step 3 ")]
    a_id = next(w["id"] for w in status["workers"] if w["name"] == "a")
    # poison@3 fires in every attempt of step 3, as a hostile replica would, so a restart of
    # step 3 for another reason refuses it again (CI 2026-12-05 refused it twice; that run's
    # events were not kept, and a round hivemind finishes on one replica only, seen on two loaded
    # cores before, restarts a step). An attempt that reaches judging refuses it once, and
    # nothing else is refused; the restarts' reasons are in the message if this fails.
    assert poisoned and all(a_id in p and p.startswith("step 3:") for p in poisoned), poisoned
    assert len(poisoned) <= 1 + len(step3_restarts), (poisoned, step3_restarts)
    assert len(status["history"][3]["stages"]["0"]["replicas"]) == 2  # the other replica's sum was used
    dead = {w["name"] for w in status["workers"] if w["state"] == "dead"}
    assert dead == {"c", "d"}
    assert status["event_counts"].get("worker_unreachable", 0) >= 1  # found by a peer's report, not a timeout
    assert recovery < 25.0  # far below the 30 s heartbeat timeout
    assert status["tickets"]["exactly_once_violations"] == []
    assert (status["tickets"]["lost"], status["tickets"]["double"]) == (0, 0)
    # The lost and refused shares are estimated from the other replica: the loss stays on the curve.
    expected, _ = local_losses(swarm.config, 7)
    got = losses(status)
    assert all(math.isfinite(x) for x in got)
    assert got[:4] == pytest.approx(expected[:4], rel=1e-5)  # before any fault took effect
    assert got == pytest.approx(expected, rel=0.05)


def local_steps_run(swarms: list, tmp, averaging: str) -> tuple[Swarm, dict]:
    """A 6-step 2 x 2 run in "local-steps" mode, outer_every 3, with `averaging` keys added;
    its status once done."""
    extra = AVERAGING.format(matchmaking_s=1.0) + 'mode = "local-steps"\nouter_every = 3\n' + averaging
    config = swarm_toml(tmp, steps=6, global_batch=8, micro_batch=2, seq_len=32, replicas_per_stage=2,
                        start_with_replicas=2, extra=extra)
    swarm = Swarm(tmp, config)
    swarms.append(swarm)
    swarm.start_coordinator()
    for name in "abcd":
        swarm.start_worker(name)
    return swarm, swarm.wait(lambda s: s["phase"] == "done", 300, "the run to finish")


def test_local_steps_average_only_at_outer_steps(tmp_path, swarms):
    """averaging.mode "local-steps", outer_every 3: replicas step on their own gradients and pass
    through an averaging round only at steps 3 (and would at 6); the anchor they share changes
    exactly there, identically on both replicas, and the run still learns."""
    swarm, status = local_steps_run(swarms, tmp_path, "")
    got = losses(status)
    expected, _ = local_losses(swarm.config, 6)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)  # same weights, same data
    assert all(math.isfinite(x) for x in got) and got[-1] < got[0]
    averaged = [{stage: d["summed_micro_batches"] for stage, d in h["stages"].items()} for h in status["history"]]
    assert averaged[3] == {"0": 2.0, "1": 2.0}  # two replicas' pseudo-gradients, weight 1 each
    assert all(v is None for i, step in enumerate(averaged) if i != 3 for v in step.values())
    for stage in ("0", "1"):
        anchors = []
        for h in status["history"]:
            digests = set(h["stages"][stage]["digests"].values())
            assert len(digests) == 1, f"stage {stage}'s replicas hold different anchors: {h['stages'][stage]}"
            anchors.append(digests.pop())
        assert anchors[0] == anchors[1] == anchors[2] != anchors[3] == anchors[4] == anchors[5]
    swarm.wait(lambda s: all(w["metrics"].get("averaging_bytes", 0) > 0 for w in s["workers"] if w["stage"] >= 0),
               10, "every replica's averaging bytes in its heartbeat")
    assert status["tickets"]["exactly_once_violations"] == []
    # Lanes (worker/routing.py): in a step attempt, each stage-0 replica sent all of its
    # micro-batches to one stage-1 replica, and no two to the same one. Load-balancing alternates
    # one sender's micro-batches between both, so without lanes almost no attempt passes; with
    # them a few may not (a partner that failed a call, on a loaded machine, is replaced for a
    # while), hence most, not all.
    with sqlite3.connect(f"file:{swarm.ledger_path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT step, attempt, ticket, stage, worker FROM commitments").fetchall()
    chains: dict[tuple, dict[int, str]] = {}
    for step, attempt, ticket, stage, worker in rows:
        chains.setdefault((step, attempt, ticket), {})[stage] = worker
    pairs: dict[tuple, set] = {}
    for (step, attempt, _), chain in chains.items():
        pairs.setdefault((step, attempt), set()).add((chain[0], chain[1]))
    assert len(pairs) >= 6
    in_lanes = [len({a for a, _ in seen}) == len({b for _, b in seen}) == len(seen) for seen in pairs.values()]
    assert sum(in_lanes) >= 0.75 * len(in_lanes), pairs
    assert_the_export_is_the_replicas_mean(swarm, tmp_path / "export")


def assert_the_export_is_the_replicas_mean(swarm: Swarm, out) -> None:
    """`gptjt export --coordinator` of a local-steps run that ended three inner steps past its
    outer step: each stage's exported weights are the mean of its two replicas', which differ."""
    import asyncio

    import torch
    from safetensors.torch import load, load_file

    from gptjt_cli.swarm_commands import export_from_swarm, operator_link_credentials
    from gptjt_core.stage_checkpoint import split_state
    from worker.transport import LinkCounters, StageClient

    status = swarm.status()
    credentials = operator_link_credentials(swarm.address, swarm.admin_token) if status["stage_link_tls"] else None
    address = {w["id"]: w["address"] for w in status["workers"]}

    async def replicas(ids: list[str]) -> list[dict]:
        client = StageClient(LinkCounters(), 1 << 20, credentials=credentials)
        client.learn(list(address.values()), list(address))
        try:
            return [split_state(load((await client.fetch_state(address[i]))[1]))[0] for i in ids]
        finally:
            await client.close()

    exported = load_file(f"{export_from_swarm(swarm.address, str(out), admin_token=swarm.admin_token)}/model.safetensors")
    for stage in status["stages"]:
        assert len(stage["members"]) == 2, stage
        first, second = asyncio.run(replicas(stage["members"]))
        assert any(not torch.equal(first[k], second[k]) for k in first), "the replicas did not drift apart"
        for name in first:
            assert torch.allclose(exported[name], (first[name] + second[name]) / 2, rtol=1e-6, atol=1e-7), name


def test_sparse_outer_steps_send_a_quarter_and_keep_one_anchor(tmp_path, swarms):
    """averaging.outer_density 0.25: at the outer step (step 3) each replica sends only a quarter
    of each pseudo-gradient's coordinates (the same ones at both: the anchors stay identical)
    and keeps the rest in its residual; its averaging bytes are about a quarter of the dense ones."""
    import math as _math

    from gptjt_core.model import StageSpec, model_config_for, stage_shapes
    from gptjt_core.outer_sparsity import kept

    swarm, status = local_steps_run(swarms, tmp_path, "outer_density = 0.25\n")
    assert all(math.isfinite(x) for x in losses(status))
    for stage in ("0", "1"):
        anchors = [set(h["stages"][stage]["digests"].values()) for h in status["history"]]
        assert all(len(a) == 1 for a in anchors), f"stage {stage}'s replicas hold different anchors"
        assert anchors[2] != anchors[3] == anchors[4]  # the outer step moved the shared anchor
    # the replicas alive now (a worker declared dead on a loaded machine joins again under a new id)
    holding = lambda s: [w for w in s["workers"] if w["stage"] >= 0 and w["state"] == "ready"]  # noqa: E731
    status = swarm.wait(lambda s: len(holding(s)) == 4 and all(w["metrics"].get("averaging_bytes", 0) > 0
                                                               for w in holding(s)),
                        10, "every replica's averaging bytes in its heartbeat")
    model = model_config_for("random:tiny:0")
    for st in status["stages"]:
        shapes = stage_shapes(model, StageSpec(st["start_layer"], st["end_layer"], embed=st["embed"], head=st["head"]))
        dense = sum(_math.prod(s) for s in shapes.values())
        sparse = sum(kept(_math.prod(s), 0.25) for s in shapes.values())
        for w in holding(status):
            if w["stage"] == st["index"]:
                # 2 replicas, float64 buffers: each sends its peer's half and returns the peer's averaged half
                sent = w["metrics"]["averaging_bytes"]
                assert 0.9 * 8 * sparse <= sent < 0.5 * 8 * dense, (w["id"], sent, sparse, dense)
    assert status["tickets"]["exactly_once_violations"] == []
