"""The cost-model scheduler in a live swarm: simulated devices of different speeds get
different layer ranges, and the measured step time lands near the predicted one on
loopback with link emulation (the links are measured by the workers' probes)."""

from __future__ import annotations

import sqlite3
import statistics
import subprocess

import pytest

from tests.swarm import BIN, Swarm, swarm_toml

FAST, SLOW = "0.012:24", "0.004:24"  # TFLOP/s : GB (the CPU computes faster than both)
LINK = """
[link]
emulate_mbit = 5.0
emulate_latency_ms = 5.0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scheduler-swarm")
    # 4 micro-batches of 2 x 64 tokens per step: the pipeline fills, so its overlap matters.
    swarm = Swarm(tmp, swarm_toml(tmp, steps=4, global_batch=8, micro_batch=2, placement="cost-model",
                                  min_workers=2, extra=LINK))
    try:
        swarm.start_coordinator()
        slow = swarm.start_worker("slow", None, "--simulate-device", SLOW)
        slow.wait_for("gptjt-worker: joined")
        fast = swarm.start_worker("fast", None, "--simulate-device", FAST)
        status = swarm.wait(lambda s: s["phase"] == "done", timeout=240, what="4 steps")
        yield swarm, status, {"slow": slow, "fast": fast}
    finally:
        swarm.close()


def test_simulated_devices_get_ranges_in_proportion_to_speed(run):
    swarm, status, _ = run
    names = {w["id"]: w["name"] for w in status["workers"]}
    stages = {i: [names[w] for w in s["workers"]] for i, s in enumerate(status["stages"])}
    ranges = status["plan"]["ranges"]
    # The tiny model's LM head (6.5M parameters) outweighs its 4 layers (0.2M each): the
    # 3x faster device takes the head and one layer, the slow one the other three.
    assert stages == {0: ["slow"], 1: ["fast"]}, stages
    assert ranges == [[0, 3], [3, 4]], ranges
    assert ranges != [[0, 2], [2, 4]]  # not the even split
    devices = {w["name"]: w["device"] for w in status["workers"]}
    assert devices["fast"]["matmul_tflops"] == pytest.approx(0.012) and devices["fast"]["at_run_dtype"]
    assert status["plan"]["placement"] == "cost-model"
    assert any(e["kind"] == "replanned" for e in status["events"])


def test_links_are_probed_and_the_step_time_matches_the_prediction(run):
    swarm, status, _ = run
    measured = [e["detail"] for e in status["events"] if e["kind"] == "measured" and "link" in e["detail"]]
    assert measured, "no link measurement reached the coordinator"
    plan = status["plan"]
    # Step 0 includes the probes sharing the emulated link and warm-up: judge the rest.
    seconds = [h["seconds"] for h in status["history"][1:]]
    measured_s, predicted_s = statistics.median(seconds), plan["predicted_step_s"]
    print(f"predicted {predicted_s:.3f} s/step, measured {measured_s:.3f} s/step ({seconds})")
    assert predicted_s > 1.0  # the simulated compute dominates the step, as intended
    assert measured_s == pytest.approx(predicted_s, rel=0.3), (measured_s, predicted_s, seconds)


def test_gptjt_stages_shows_the_plan_and_its_prediction(run):
    swarm, _, _ = run
    out = subprocess.run([str(BIN / "gptjt"), "stages", "--coordinator", swarm.address], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "predicted step" in out.stdout and "0-3" in out.stdout and "3-4" in out.stdout, out.stdout


def test_a_faster_joiner_takes_over_at_the_next_checkpoint(tmp_path):
    """Churn mid-run: two slow workers train; a 5x faster one joins. The better plan moves a
    worker that holds state, so it waits for the next complete checkpoint, then applies:
    the joiner holds a stage, the slower worker it replaces waits on standby with a reason,
    and the run finishes with every micro-batch counted once."""
    # 10 steps: the joiner's plan must pay back its layer loads over the steps left (plan_horizon.py)
    steps = 10
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=steps, checkpoint_every=1, placement="cost-model",
                                       min_workers=2, timeout_s=5.0))
    try:
        swarm.start_coordinator()
        first = [swarm.start_worker(n, None, "--simulate-device", "0.004:24") for n in ("a", "b")]
        for w in first:
            w.wait_for("gptjt-worker: joined")
        swarm.wait(lambda s: s["step"] >= 2, timeout=120, what="2 steps on the slow workers")
        # Paused until the better plan waits for a checkpoint: on two loaded cores a worker can
        # take ~40 s to start, longer than the steps left (a joiner missed a whole run so in CI).
        swarm.operate("pause")
        swarm.start_worker("fast", None, "--simulate-device", "0.02:24")
        swarm.wait(lambda s: any(e["kind"] == "replan_pending" for e in s["events"]), timeout=240,
                   what="the plan with the joiner to wait for a checkpoint")
        swarm.operate("resume")
        status = swarm.wait(lambda s: s["phase"] == "done", timeout=240, what="the run to finish")
    finally:
        swarm.close()
    plan = status["plan"]
    names = {w["id"]: w["name"] for w in status["workers"]}
    holders = {names[w] for s in status["stages"] for w in s["workers"]}
    events = "\n".join(f"{e['kind']}: {e['detail']}" for e in status["events"])
    assert "fast" in holders and len(holders) == 2, events
    waiting = ({"a", "b"} - holders).pop()
    waiting_id = next(i for i, n in names.items() if n == waiting)
    assert "replica" in plan["standby_why"][waiting_id]
    last = plan["last_replan"]
    assert last["at_restore"] and last["step"] >= 2 and plan["layers_moved_total"] > 0, last
    assert any(e["kind"] == "replan_pending" for e in status["events"])
    assert status["tickets"]["exactly_once_violations"] == []
    assert len(status["history"]) == steps and all(h["loss"] == h["loss"] for h in status["history"])
    # the checkpoint re-plan's reloads were timed, from its apply to the next step's open (replan_stall.py)
    with sqlite3.connect(f"file:{swarm.ledger_path}?mode=ro", uri=True) as db:
        timed = [d for (d,) in db.execute("SELECT detail FROM events WHERE kind='measured' AND detail LIKE "
                                          "'a re-plan at a checkpoint held the run%'")]
    print(timed)
    assert len(timed) == 1 and plan["reload_s"] >= 0.0, events


def test_the_coordinator_chooses_fewer_stages_than_the_config_when_the_devices_call_for_it(tmp_path):
    """pipeline.num_stages 2 with min_stages 1: of two simulated devices one is 24x slower, so
    one stage on the fast worker beats any pipeline through the slow one. The live coordinator
    plans 1 stage (layers 0-4), the slow worker waits on standby with the reason, and the run
    trains exactly once."""
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=3, global_batch=8, micro_batch=2, placement="cost-model",
                                       min_workers=2, min_stages=1))
    try:
        swarm.start_coordinator()
        swarm.start_worker("slow", None, "--simulate-device", "0.0005:24").wait_for("gptjt-worker: joined")
        swarm.start_worker("fast", None, "--simulate-device", FAST)
        status = swarm.wait(lambda s: s["phase"] == "done", timeout=240, what="3 steps")
    finally:
        swarm.close()
    assert status["plan"]["ranges"] == [[0, 4]], status["plan"]
    names = {w["id"]: w["name"] for w in status["workers"]}
    assert [[names[w] for w in s["workers"]] for s in status["stages"]] == [["fast"]]
    slow = next(w for w in status["workers"] if w["name"] == "slow")
    assert slow["stage"] < 0 and slow["id"] in status["plan"]["standby_why"], status["plan"]["standby_why"]
    assert len(status["history"]) == 3 and status["tickets"]["exactly_once_violations"] == []
