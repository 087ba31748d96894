"""Stage checkpoints with real processes: rollback to a checkpoint, full-run resume, re-slicing."""

from __future__ import annotations

import signal
import time

import pytest

from tests.swarm import Swarm, local_losses, swarm_toml


def started(swarms: list, tmp, names: str = "ab", **kw) -> tuple[Swarm, dict]:
    """A coordinator and one worker per name, on a run that checkpoints every 2 steps."""
    swarm = Swarm(tmp, swarm_toml(tmp, timeout_s=3.0, checkpoint_every=2, **kw))
    swarms.append(swarm)
    swarm.start_coordinator()
    return swarm, {name: swarm.start_worker(name) for name in names}


def losses(status: dict) -> list[float]:
    return [h["loss"] for h in status["history"]]


def test_lost_stage_rolls_back_to_its_checkpoint_and_stays_on_the_curve(tmp_path, swarms):
    swarm, procs = started(swarms, tmp_path, steps=6, extra="keep_checkpoints = 2")
    config = swarm.config
    status = swarm.wait(lambda s: s["step"] >= 3, 180, "three steps")
    assert status["checkpoints"]["latest_complete"] == 2
    victim = next(w["name"] for w in status["workers"] if w["stage"] == 1)
    procs[victim].kill(signal.SIGKILL)
    swarm.wait(lambda s: any(w["state"] == "dead" for w in s["workers"]), 30, "the death")
    swarm.start_worker("c")
    status = swarm.wait(lambda s: s["phase"] == "done", 180, "the run to finish")
    rolled = [e["detail"] for e in status["events"] if e["kind"] == "rolled_back"]
    assert rolled and "rolled back to step 2 (checkpoint)" in rolled[-1]
    expected, _ = local_losses(config, 6)
    assert losses(status) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert status["tickets"]["exactly_once_violations"] == []
    # keep_checkpoints = 2: step 2 (the one rolled back to) went once step 6 was complete
    assert status["checkpoints"]["steps"] == [4, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    # the newcomer restored from the store, and the survivor too (it was past step 2)
    assert "from the checkpoint store" in (tmp_path / "worker-c.log").read_text()


def test_everything_killed_then_resumed_from_the_store(tmp_path, swarms):
    swarm, _ = started(swarms, tmp_path, steps=5)
    config = swarm.config
    swarm.wait(lambda s: s["step"] >= 3, 180, "three steps")
    for proc in swarm.procs:
        proc.kill(signal.SIGKILL)
    for proc in swarm.procs:
        proc.p.wait(10)
    time.sleep(0.5)
    swarm.start_coordinator()  # same ledger; its workers are gone
    swarm.start_worker("c")
    swarm.start_worker("d")
    status = swarm.wait(lambda s: s["phase"] == "done", 240, "the resumed run to finish")
    expected, _ = local_losses(config, 5)
    assert losses(status) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert status["tickets"]["exactly_once_violations"] == []
    assert any("rolled back to step 2 (checkpoint)" in e["detail"] for e in status["events"])
    # 5 steps is no multiple of checkpoint_every = 2: the last step still leaves its weights in the store
    assert status["checkpoints"]["latest_complete"] == 5
    assert (tmp_path / "checkpoints" / "step-00000005").is_dir()


def test_resume_with_three_stages_from_a_two_stage_store(tmp_path, swarms):
    first = tmp_path / "first"
    first.mkdir()
    swarm, _ = started(swarms, first, steps=2)
    config = swarm.config
    swarm.wait(lambda s: s["phase"] == "done", 120, "the 2-stage run")
    swarm.close()

    second = tmp_path / "second"
    second.mkdir()
    swarm3, _ = started(swarms, second, "xyz", steps=4, num_stages=3,
                        extra=f'checkpoint_store = "{first / "checkpoints"}"\nresume_from_store = true')
    status = swarm3.wait(lambda s: s["phase"] == "done", 180, "the 3-stage run")
    assert [(s["start_layer"], s["end_layer"]) for s in status["stages"]] == [(0, 1), (1, 3), (3, 4)]
    assert [h["step"] for h in status["history"]] == [2, 3]
    assert "resumed_from_store" in [e["kind"] for e in status["events"]]
    expected, _ = local_losses(config, 4)  # the same run, uninterrupted, in one process
    assert losses(status) == pytest.approx(expected[2:], rel=1e-6, abs=1e-6)

    from gptjt_cli.swarm_commands import export_from_store

    out = export_from_store(str(first / "checkpoints"), str(tmp_path / "hf"), step=2, source="random:tiny:0")
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "GPTJForCausalLM"
