"""Export: stage state dicts -> a checkpoint plain transformers loads and generates from."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from gptjt_core.export import export_checkpoint, merge_stage_states
from gptjt_core.model import StageSpec, load_stage, model_config_for


@pytest.fixture(scope="module")
def stages(tiny_checkpoint):
    return [load_stage(str(tiny_checkpoint), s) for s in StageSpec.even_split(4, 3)]


def test_exported_stages_load_in_plain_transformers_with_the_same_logits(stages, tiny_checkpoint, tmp_path, tokenizer):
    out = export_checkpoint([s.state_dict() for s in stages], model_config_for(str(tiny_checkpoint)),
                            tmp_path / "hf", tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "GPTJForCausalLM"
    ids = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = ids
        for s in stages:
            h = s.eval()(h, torch.zeros(2, dtype=torch.long))
        assert (model(ids).logits - h).abs().max() < 1e-5
    assert AutoTokenizer.from_pretrained(str(out))("Hello world")["input_ids"] == [15496, 995]
    generated = pipeline("text-generation", model=str(out), device="cpu")(
        "Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert generated.startswith("Hello") and len(generated) > len("Hello")


def test_half_precision_export(stages, tiny_checkpoint, tmp_path):
    out = export_checkpoint([s.state_dict() for s in stages], model_config_for(str(tiny_checkpoint)),
                            tmp_path / "bf16", dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_merge_refuses_overlap_and_gaps(stages):
    states = [s.state_dict() for s in stages]
    with pytest.raises(ValueError, match="missing .*transformer.h.1"):
        merge_stage_states([states[0], states[2]], 4)
    with pytest.raises(ValueError, match="two stages"):
        merge_stage_states([states[0], states[0], states[1], states[2]], 4)
