"""Stages reproduce GPTJForCausalLM exactly, read only their own tensors, and apply the prefix mask."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import GPTJForCausalLM

from gptjt_core.checkpoint import CheckpointError, CheckpointReader, write_checkpoint
from gptjt_core.model import StageSpec, load_stage

N_LAYER = 4


def all_splits(n_layer: int):
    """Every way to cut layers [0, n) into contiguous non-empty stages (2^(n-1) of them)."""
    for cuts in itertools.product([False, True], repeat=n_layer - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n_layer]
        yield [StageSpec(a, b, embed=i == 0, head=i == len(bounds) - 2)
               for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return GPTJForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))


def run_chain(specs, source, x, prefix, attn="sdpa"):
    h = x
    for spec in specs:
        h = load_stage(str(source), spec, attn_implementation=attn).eval()(h, prefix)
    return h


@pytest.mark.parametrize("specs", list(all_splits(N_LAYER)), ids=lambda s: "|".join(f"{p.start}-{p.end}" for p in s))
def test_any_split_reproduces_hf_logits(specs, tiny_checkpoint, reference, ids):
    with torch.no_grad():
        expected = reference(ids).logits
        got = run_chain(specs, tiny_checkpoint, ids, torch.zeros(2, dtype=torch.long))
    assert got.shape == expected.shape == (2, 40, 50400)
    assert (got - expected).abs().max() < 1e-5


def test_eager_and_sdpa_agree_with_prefix(tiny_checkpoint, ids):
    prefix = torch.tensor([7, 0])
    full = [StageSpec(0, N_LAYER, embed=True, head=True)]
    with torch.no_grad():
        a = run_chain(full, tiny_checkpoint, ids, prefix, "sdpa")
        b = run_chain(full, tiny_checkpoint, ids, prefix, "eager")
    assert (a - b).abs().max() < 1e-4


def test_gradients_across_stage_boundaries_match_the_whole_model(tiny_checkpoint, ids):
    prefix = torch.tensor([5, 9])
    whole = load_stage(str(tiny_checkpoint), StageSpec(0, N_LAYER, embed=True, head=True))
    whole(ids, prefix).logsumexp(-1).sum().backward()
    stages = [load_stage(str(tiny_checkpoint), s) for s in StageSpec.even_split(N_LAYER, 2)]
    h0 = stages[0](ids, prefix)
    h_in = h0.detach().requires_grad_()  # what crosses the wire
    stages[1](h_in, prefix).logsumexp(-1).sum().backward()
    h0.backward(h_in.grad)
    grads = {n: p.grad for s in stages for n, p in s.named_parameters()}
    for name, p in whole.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-5, rtol=1e-4), name


def test_load_stage_reads_only_its_layers(tiny_checkpoint):
    spec = StageSpec(1, 3)
    reader = CheckpointReader(str(tiny_checkpoint))
    stage = load_stage(str(tiny_checkpoint), spec, reader=reader)
    assert sorted(reader.tensors_read) == sorted(spec.tensor_names(N_LAYER))
    assert all(".h.1." in n or ".h.2." in n for n in reader.tensors_read)
    assert sorted(stage.state_dict()) == sorted(spec.tensor_names(N_LAYER))


def test_sharded_safetensors_and_torch_bin_give_the_same_stage(tiny_checkpoint, tmp_path, ids):
    reader = CheckpointReader(str(tiny_checkpoint))
    state = reader.read(reader.keys())
    config = reader.config
    sharded = write_checkpoint(state, config, tmp_path / "sharded", max_shard_bytes=2_000_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 3
    # a sharded .bin checkpoint with an index, as older hub repos ship
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for file_name, keys in halves.items():
        torch.save({k: state[k] for k in keys}, bin_dir / file_name)
        weight_map.update({k: file_name for k in keys})
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    spec = StageSpec(0, 2, embed=True)
    prefix = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        outs = [load_stage(str(d), spec)(ids, prefix) for d in (tiny_checkpoint, sharded, bin_dir)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    bin_reader = CheckpointReader(str(bin_dir))
    load_stage(str(bin_dir), StageSpec(3, 4, head=True), reader=bin_reader)
    assert sorted(bin_reader.tensors_read) == sorted(StageSpec(3, 4, head=True).tensor_names(N_LAYER))


def test_random_source_is_identical_however_sliced():
    whole = load_stage("random:tiny:3", StageSpec(0, N_LAYER, embed=True, head=True)).state_dict()
    part = load_stage("random:tiny:3", StageSpec(2, 4, head=True)).state_dict()
    assert all(torch.equal(part[k], whole[k]) for k in part)
    other = load_stage("random:tiny:4", StageSpec(2, 4, head=True)).state_dict()
    assert not torch.equal(other["transformer.h.2.attn.q_proj.weight"], part["transformer.h.2.attn.q_proj.weight"])


def test_prefix_mask_on_the_real_model(tiny_checkpoint):
    model = load_stage(str(tiny_checkpoint), StageSpec(0, N_LAYER, embed=True, head=True)).eval()
    ids = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(2))
    p = 10
    prefix = torch.tensor([p])
    with torch.no_grad():
        base = model(ids, prefix)
        # a change to the LAST prefix token reaches every earlier prefix position
        changed = ids.clone()
        changed[0, p - 1] = (changed[0, p - 1] + 1) % 50257
        out = model(changed, prefix)
        assert ((out[0, : p - 1] - base[0, : p - 1]).abs().amax(-1) > 1e-6).all()
        # ...but not under a plain causal mask
        causal_base, causal_out = model(ids, torch.tensor([0])), model(changed, torch.tensor([0]))
        assert torch.equal(causal_base[0, : p - 1], causal_out[0, : p - 1])
        # a change to a target token never reaches earlier positions
        t = 15
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 50257
        out = model(changed, prefix)
        assert torch.equal(out[0, :t], base[0, :t])
        assert (out[0, t:] - base[0, t:]).abs().max() > 1e-6


def test_bad_inputs_are_refused_clearly(tiny_checkpoint, tmp_path):
    first = load_stage(str(tiny_checkpoint), StageSpec(0, 2, embed=True))
    second = load_stage(str(tiny_checkpoint), StageSpec(2, 4, head=True))
    with pytest.raises(ValueError, match="token id 50400 is outside the vocabulary"):
        first(torch.tensor([[1, 50400]]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expects hidden states \(B, T, 128\)"):
        second(torch.zeros(1, 4, 64), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix lengths"):
        second(torch.zeros(1, 4, 128), torch.tensor([9]))
    with pytest.raises(ValueError, match="exceed the model's 4 layers"):
        load_stage(str(tiny_checkpoint), StageSpec(2, 6))
    with pytest.raises(CheckpointError, match="not a directory"):
        load_stage(str(tmp_path / "nowhere" / "ckpt"), StageSpec(0, 1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_stage(str(tmp_path / "empty"), StageSpec(0, 1))
