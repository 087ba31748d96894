"""Stage checkpoints: save per stage, re-slice into another layout, restore bit-identically."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from gptjt_core.config import OptimConfig
from gptjt_core.model import StageSpec, build_stage, load_stage, model_config_for
from gptjt_core.optim import build_optimizer
from coordinator.checkpoint_store import CheckpointStore
from gptjt_core.stage_checkpoint import restore_optimizer, split_state, stage_state_tensors

SOURCE = "random:tiny:5"


def trained_stage(spec: StageSpec):
    stage = load_stage(SOURCE, spec)
    opt = build_optimizer(stage.parameters(), OptimConfig(lr=1e-3))
    x = torch.randint(0, 50257, (1, 8)) if spec.embed else torch.randn(1, 8, 128)
    stage(x, torch.zeros(1, dtype=torch.long)).float().pow(2).mean().backward()
    opt.step()
    return stage, opt


def test_two_stage_checkpoint_reslices_into_three_stages(tmp_path):
    n_layer = 4
    store = CheckpointStore(str(tmp_path / "store"))
    originals = {}
    for spec in StageSpec.even_split(n_layer, 2):
        stage, opt = trained_stage(spec)
        tensors = stage_state_tensors(stage, opt)
        originals.update(tensors)
        store.put(10, spec, save(tensors))
    assert store.steps() == [10] and store.is_complete(10, n_layer) and store.latest_complete(n_layer) == 10
    config = model_config_for(SOURCE)
    for spec in StageSpec.even_split(n_layer, 3):
        tensors = store.get(10, spec, n_layer)
        weights, optim = split_state(tensors)
        stage = build_stage(config, spec, weights)
        opt = build_optimizer(stage.parameters(), OptimConfig(lr=1e-3))
        restore_optimizer(opt, stage, optim)
        again = stage_state_tensors(stage, opt)
        assert set(again) == set(tensors)
        assert all(torch.equal(again[k], originals[k]) for k in again)


def test_incomplete_steps_and_missing_tensors(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    spec = StageSpec(0, 2, embed=True)
    stage, opt = trained_stage(spec)
    store.put(3, spec, save(stage_state_tensors(stage, opt)))
    assert not store.is_complete(3, 4) and store.latest_complete(4) is None
    with pytest.raises(FileNotFoundError, match="lacks .* stage StageSpec\\(start=2"):
        store.get(3, StageSpec(2, 4, head=True), 4)
    with pytest.raises(ValueError, match="not a valid safetensors blob"):
        store.put(4, spec, b"not a safetensors blob")
    assert 4 not in store.steps() or not store.specs(4)


def test_store_on_an_fsspec_url(tmp_path):
    """Any fsspec filesystem works (memory:// stands in for s3:// or gs:// here)."""
    store = CheckpointStore("memory://gptjt-test-store/run")
    saved = {}
    for spec in StageSpec.even_split(4, 2):
        stage, opt = trained_stage(spec)
        saved.update(stage_state_tensors(stage, opt))
        store.put(6, spec, save(stage_state_tensors(stage, opt)))
    assert store.latest_complete(4) == 6
    whole = store.get(6, StageSpec(0, 4, embed=True, head=True), 4)
    assert set(whole) == set(saved) and all(torch.equal(whole[k], saved[k]) for k in whole)
