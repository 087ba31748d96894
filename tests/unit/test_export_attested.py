"""`gptjt export --coordinator` takes a member's weights only if they are the state it reported to
the ledger after the last closed step (gptjt_cli/swarm_commands.AttestedDigests): the digest the
export recomputes from the bytes it was sent is the one the replica computed on its live model
(gptjt_core/state_digest.py)."""

from __future__ import annotations

import torch
from safetensors.torch import load

from gptjt_cli.swarm_commands import AttestedDigests
from gptjt_core.config import AveragingConfig, ModelConfig, PipelineConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec
from gptjt_core.stage_checkpoint import OUTER
from worker.stage import LayerSlice

SPEC = StageSpec(0, 2, embed=True)


def _stage(mode: str = "every-step") -> LayerSlice:
    run = RunConfig(model=ModelConfig(source="random:tiny:0"), train=TrainConfig(global_batch=4, micro_batch=2),
                    pipeline=PipelineConfig(replicas_per_stage=2), averaging=AveragingConfig(mode=mode, outer_every=2))
    return LayerSlice(run, SPEC)


def _status(step: int, digests: dict[str, str], stage: int = 0) -> dict:
    return {"history": [{"step": step - 1, "stages": {}},
                        {"step": step, "stages": {str(stage): {"replicas": list(digests), "digests": digests}}}]}


def _served(stage: LayerSlice) -> dict[str, torch.Tensor]:
    return load(stage.checkpoint_blob())  # what FetchState sends, as the export reads it


def test_a_members_own_state_passes_and_altered_weights_are_refused():
    stage = _stage()
    stage.last_applied = 6  # it holds the state after step 6: position 7
    attested = AttestedDigests.of_stage(_status(6, {"w1": stage.state_digest()}), 0)
    served = _served(stage)
    assert attested.refusal("w1", 7, served) == ""
    name = next(n for n in served if n.endswith("q_proj.weight"))
    served[name] = served[name].clone()
    served[name].view(-1)[0] += 1.0  # one sampled value of one tensor
    why = attested.refusal("w1", 7, served)
    assert "is not the one it reported after step 6" in why and stage.state_digest() in why


def test_in_local_steps_mode_the_anchor_is_what_is_attested():
    stage = _stage("local-steps")
    with torch.no_grad():
        next(stage.model.parameters()).add_(0.5)  # inner steps moved the weights away from the anchor
    stage.last_applied = 2
    attested = AttestedDigests.of_stage(_status(2, {"w1": stage.state_digest()}), 0)
    served = _served(stage)
    assert attested.refusal("w1", 3, served) == ""
    name = next(n for n in served if n.startswith(f"{OUTER}anchor/"))
    served[name] = served[name] + 1.0
    assert "not the one it reported" in attested.refusal("w1", 3, served)


def test_nothing_to_check_against_is_not_a_refusal():
    stage = _stage()
    served = _served(stage)
    altered = {n: t + 1.0 if t.is_floating_point() else t for n, t in served.items()}
    assert AttestedDigests.of_stage({"history": []}, 0).refusal("w1", 0, altered) == ""  # no step closed yet
    attested = AttestedDigests.of_stage(_status(6, {"w1": stage.state_digest()}), 0)
    assert attested.refusal("w1", 9, altered) == ""  # another step: the steps' mismatch fails the export
    assert attested.refusal("w7", 7, altered) == ""  # no member: a stand-in for a stage without one
    assert AttestedDigests.of_stage(_status(6, {"w1": "ab"}, stage=1), 0).by_worker == {}
