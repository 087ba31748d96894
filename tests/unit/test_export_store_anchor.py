"""`gptjt export --store` of a local-steps run: the stored checkpoint holds its writer's own weights
(drifted from the other replicas' since the last outer step) and the anchor the replicas share;
the export says so, and `--anchor` exports the anchor (gptjt_cli/swarm_commands.store_weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from coordinator.checkpoint_store import CheckpointStore
from gptjt_cli.swarm_commands import export_from_store
from gptjt_core.config import AveragingConfig, ModelConfig, PipelineConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec, model_config_for
from worker.stage import LayerSlice

SOURCE = "random:tiny:0"


def _stored(tmp_path, mode: str) -> tuple[str, LayerSlice]:
    """A store whose step 3 is one whole-model stage of a run in `mode`, its weights moved by 0.25
    from where they started (in local-steps mode: from the anchor)."""
    run = RunConfig(model=ModelConfig(source=SOURCE), train=TrainConfig(global_batch=4, micro_batch=2),
                    pipeline=PipelineConfig(replicas_per_stage=2), averaging=AveragingConfig(mode=mode, outer_every=2))
    n_layer = model_config_for(SOURCE).n_layer
    stage = LayerSlice(run, StageSpec(0, n_layer, embed=True, head=True))
    with torch.no_grad():
        for p in stage.model.parameters():
            p.add_(0.25)
    root = str(tmp_path / "store")
    CheckpointStore(root).put(3, stage.spec, stage.checkpoint_blob())
    return root, stage


def test_a_local_steps_checkpoint_exports_its_writers_weights_with_a_warning_or_the_anchor(tmp_path, capsys):
    root, stage = _stored(tmp_path, "local-steps")
    writer = load_file(f"{export_from_store(root, str(tmp_path / 'writer'), source=SOURCE)}/model.safetensors")
    assert "is of a local-steps run" in capsys.readouterr().err
    shared = load_file(f"{export_from_store(root, str(tmp_path / 'anchor'), source=SOURCE, anchor=True)}"
                       "/model.safetensors")
    assert "local-steps" not in capsys.readouterr().err
    for (name, p), a in zip(stage.model.named_parameters(), stage.anchor):
        assert torch.equal(writer[name], p.detach()), name
        assert torch.equal(shared[name], a) and not torch.equal(a, p.detach()), name


def test_anchor_of_a_run_without_local_steps_is_refused(tmp_path, capsys):
    root, _ = _stored(tmp_path, "every-step")
    with pytest.raises(ValueError, match="step 3 holds no anchor: it is not of a local-steps run"):
        export_from_store(root, str(tmp_path / "out"), source=SOURCE, anchor=True)
    export_from_store(root, str(tmp_path / "out"), source=SOURCE)
    assert capsys.readouterr().err == ""  # nothing to warn about
