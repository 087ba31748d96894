"""A copied stage state is taken only if it is one the stage's members reported to the ledger after
the last closed step (gptjt_core/state_digest.unattested): by `gptjt export --coordinator`
(gptjt_cli/swarm_commands.AttestedDigests) and by a joiner. The digest recomputed from the bytes
FetchState sends is the one the replica computed on its live model."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load

from gptjt_cli.swarm_commands import AttestedDigests, _stage_mean
from gptjt_core.config import AveragingConfig, ModelConfig, PipelineConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec
from gptjt_core.stage_checkpoint import OUTER
from gptjt_core.state_digest import unattested
from worker.stage import LayerSlice

SPEC = StageSpec(0, 2, embed=True)


def _stage(mode: str = "every-step") -> LayerSlice:
    run = RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(global_batch=4, micro_batch=2),
                    pipeline=PipelineConfig(replicas_per_stage=2), averaging=AveragingConfig(mode=mode, outer_every=2))
    return LayerSlice(run, SPEC)


def _status(step: int, digests: dict[str, str], layers: list[int] | None = None) -> dict:
    """A status whose last closed step is `step`, stage 0 holding layers 0-2."""
    reported = {"replicas": list(digests), "digests": digests, "layers": layers or [SPEC.start, SPEC.end]}
    return {"stages": [{"index": 0, "start_layer": SPEC.start, "end_layer": SPEC.end}],
            "history": [{"step": step - 1, "stages": {}}, {"step": step, "stages": {"0": reported}}]}


def _served(stage: LayerSlice) -> dict[str, torch.Tensor]:
    return load(stage.checkpoint_blob())  # what FetchState sends, as the export reads it


def test_a_members_own_state_passes_and_altered_weights_are_refused():
    stage = _stage()
    stage.last_applied = 6  # it holds the state after step 6: position 7
    attested = AttestedDigests.of_stage(_status(6, {"w1": stage.state_digest(), "w2": "0" * 32}), 0)
    served = _served(stage)
    assert attested.refusal(7, served) == ""
    name = next(n for n in served if n.endswith("q_proj.weight"))
    served[name] = served[name].clone()
    served[name].view(-1)[0] += 1.0  # one sampled value of one tensor
    why = attested.refusal(7, served)
    assert "none the stage's members reported after 7 steps" in why and stage.state_digest() in why


def test_a_value_between_the_samples_of_the_old_digest_is_caught():
    """The digest hashes every byte: until 2026-12-06 it hashed every k-th value of a tensor over
    2^20 values (every 6th of the tiny embedding), so a change to the values in between passed."""
    stage = _stage()
    embedding = dict(stage.model.named_parameters())["transformer.wte.weight"]  # 50,400 x 128
    with torch.no_grad():
        embedding.view(-1)[1] += 1.0
    attested = AttestedDigests.of_stage(_status(0, {"w1": _stage().state_digest()}), 0)
    assert "is none the stage's members reported" in attested.refusal(1, _served(stage))


def test_in_local_steps_mode_the_anchor_is_what_is_attested():
    stage = _stage("local-steps")
    with torch.no_grad():
        next(stage.model.parameters()).add_(0.5)  # inner steps moved the weights away from the anchor
    stage.last_applied = 2
    attested = AttestedDigests.of_stage(_status(2, {"w1": stage.state_digest()}), 0)
    served = _served(stage)
    assert attested.refusal(3, served) == ""
    name = next(n for n in served if n.startswith(f"{OUTER}anchor/"))
    served[name] = served[name] + 1.0
    assert "is none the stage's members reported" in attested.refusal(3, served)


def test_a_state_of_another_step_is_refused_and_nothing_to_check_against_is_not():
    stage = _stage()
    served = _served(stage)
    altered = {n: t + 1.0 if t.is_floating_point() else t for n, t in served.items()}
    attested = AttestedDigests.of_stage(_status(6, {"w1": stage.state_digest()}), 0)
    assert "export again once it closes" in attested.refusal(8, served)  # applied step 7 already
    assert "a replica left behind" in attested.refusal(5, served)  # older than the status's window
    assert AttestedDigests.of_stage({"stages": _status(1, {})["stages"], "history": []}, 0).refusal(0, altered) == ""
    moved = AttestedDigests.of_stage(_status(6, {"w1": stage.state_digest()}, layers=[0, 3]), 0)
    assert moved.unchecked(7) and moved.refusal(7, altered) == ""  # digests of another layer range
    assert unattested(altered, 7, 0, ()) == ""  # the assignment of a joiner with nothing to check


def test_after_a_replan_the_new_range_is_taken_unchecked_until_a_step_closes_on_it(capsys):
    """Digests cover a whole stage: after a re-plan that moved layers, no member has reported one of
    the new range until a step closes on it. An older row of the same range (before the plan
    changed twice) is no reason to refuse the state: that refusal told a finished run's export to
    wait for a step that would never close (a chaos soak, 2026-12-06)."""
    stage = _stage()
    stage.last_applied = 7  # the state after 8 steps
    status = _status(7, {"w1": "0" * 64}, layers=[0, 3])  # step 7 closed on layers 0-3
    status["history"][0]["stages"] = {"0": {"digests": {"w1": "1" * 64}, "layers": [SPEC.start, SPEC.end]}}
    attested = AttestedDigests.of_stage(status, 0)
    assert attested.by_position == {7: ("1" * 64,), 8: None}
    assert attested.unchecked(8) and not attested.unchecked(7)
    assert "is none the stage's members reported" in attested.refusal(7, _served(stage))

    class _Replica:
        async def fetch_state(self, address):
            return SimpleNamespace(position=8), stage.checkpoint_blob()

    positions, skipped = {}, []
    asyncio.run(_stage_mean(_Replica(), 0, [("w1", "h:1")], positions, skipped, attested, lambda: status))
    assert (positions, skipped) == ({"w1": 8}, [])
    assert "is taken unchecked: its layer range changed at a re-plan" in capsys.readouterr().err


def test_a_replica_a_step_ahead_of_the_status_is_checked_against_the_status_read_again():
    """The export reads the status, then fetches the replicas; a step that closes in between puts
    a replica one step past the digests it read. It reads the status again, once, and checks the
    state against that step's digests; with no newer status the state is refused, not taken
    unchecked."""
    stage = _stage()
    stage.last_applied = 7  # the state after 8 steps
    before, after = _status(6, {"w1": "0" * 64}), _status(7, {"w1": stage.state_digest()})

    class _Replica:  # stands in for the stage link: answers FetchState with the stage's own state
        async def fetch_state(self, address):
            return SimpleNamespace(position=8), stage.checkpoint_blob()

    positions, skipped = {}, []
    asyncio.run(_stage_mean(_Replica(), 0, [("w1", "h:1")], positions, skipped, AttestedDigests.of_stage(before, 0),
                            lambda: after))
    assert (positions, skipped) == ({"w1": 8}, [])
    with pytest.raises(RuntimeError, match="export again once it closes"):
        asyncio.run(_stage_mean(_Replica(), 0, [("w1", "h:1")], {}, [], AttestedDigests.of_stage(before, 0),
                                lambda: before))


def test_a_row_without_a_range_records_no_digests_for_either_reader():
    """recorded_digests: what the coordinator (a joiner's assignment) and the export read alike."""
    from gptjt_core.recorded_digests import recorded_digests

    assert recorded_digests({"layers": [0, 2], "digests": {"w2": "b", "w1": "a", "w3": "a"}}) == ((0, 2), ("a", "b"))
    assert recorded_digests({"layers": [0, 2]}) == ((0, 2), ())
    for malformed in (None, [], {"digests": {"w1": "a"}}, {"layers": [0], "digests": {}},
                      {"layers": [0, 2], "digests": ["a"]}):
        assert recorded_digests(malformed) is None, malformed


def test_where_replicas_must_be_identical_only_a_majoritys_digest_is_attested():
    """A member that reports the digest of the altered weights it hands out passed its own copies
    while every member's digest counted; with exact averaging a strict majority's is the only one."""
    from coordinator.ledger.rules import attested_digests

    assert attested_digests({"a": "d", "b": "d", "liar": "x"}, exact=True) == ["d"]
    assert attested_digests({"a": "d", "liar": "x"}, exact=True) == ["d", "x"]  # a tie: no telling who lies
    assert attested_digests({"a": "d", "b": "d", "c": "x", "liar": "y"}, exact=True) == ["d", "x", "y"]  # 2 of 4
    assert attested_digests({"a": "d", "b": "d", "liar": "x"}, exact=False) == ["d", "x"]  # lossy: a rounding apart
    assert attested_digests({"a": "d"}, exact=True) == ["d"] and attested_digests({}, exact=True) == []


def test_the_close_records_the_majoritys_digest_and_a_joiner_is_sent_only_that(tmp_path):
    from coordinator.ledger import RunLedger
    from coordinator.scheduler import plan_stages
    from tests.conftest import small_run
    from tests.unit.test_ledger import Clock, at, commit_all, ready_swarm

    run = small_run(steps=3, global_batch=12, micro_batch=2)  # 6 micro-batches: 2 for each replica
    run.pipeline.num_stages, run.pipeline.replicas_per_stage = 2, 3
    ledger = RunLedger(at(tmp_path), run, plan_stages(4, 2), Clock())
    by_stage: dict[int, list[str]] = {}
    for w in ready_swarm(ledger, 6):
        by_stage.setdefault(ledger.assignment(w)["stage"], []).append(w)
    liar = by_stage[1][2]
    assert commit_all(ledger, by_stage[0]) == 6
    members = [w for ids in by_stage.values() for w in ids]
    for kind, extra in (("contribution", {"grad_norm_sq": 4.0, "micro_batches": 2}),
                        ("averaged", {"grad_norm_sq": 16.0, "group_weight": 6.0})):
        for w in members:
            assert ledger.report(w, 0, 0, kind, **extra)
    for w in members:
        assert ledger.report(w, 0, 0, "applied", digest="altered" if w == liar else "same")
    assert ledger.step == 1
    row = ledger.status()["history"][0]["stages"]
    assert row["1"]["attested"] == ["same"] and row["1"]["digests"][liar] == "altered"
    assert AttestedDigests.of_stage(ledger.status(), 1).by_position == {1: ("same",)}
    ledger.declare_dead(by_stage[1][0], "gone")
    joiner = ledger.join("joiner", "h:j", {})["id"]
    assert ledger.assignment(joiner)["stage"] == 1
    assert ledger.assignment(joiner)["attested_digests"] == ["same"]
