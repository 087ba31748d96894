"""Assemble stage state dicts into a Hugging Face checkpoint that transformers loads as is."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import GPTJConfig

from .checkpoint import write_checkpoint
from .model import StageSpec


def hf_config_dict(config: GPTJConfig, dtype: torch.dtype) -> dict:
    """config.json contents for a GPTJForCausalLM checkpoint whose tensors are `dtype`."""
    cfg = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    cfg.update(architectures=["GPTJForCausalLM"], model_type="gptj",
               dtype=str(dtype).removeprefix("torch."))
    return cfg


def merge_stage_states(states: Iterable[Mapping[str, torch.Tensor]], n_layer: int) -> dict[str, torch.Tensor]:
    """Union of stage state dicts; every tensor of the model exactly once, or a clear error."""
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        for name, tensor in state.items():
            if name in merged:
                raise ValueError(f"tensor {name} comes from two stages; stages must not overlap")
            merged[name] = tensor
    expected = StageSpec(0, n_layer, embed=True, head=True).tensor_names(n_layer)
    missing = [n for n in expected if n not in merged]
    extra = sorted(set(merged) - set(expected))
    if missing or extra:
        raise ValueError(f"stages do not cover the model exactly: missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}")
    return {n: merged[n] for n in expected}


def export_checkpoint(states: Iterable[Mapping[str, torch.Tensor]], config: GPTJConfig,
                      out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write a GPTJForCausalLM checkpoint (+ tokenizer) that `AutoModelForCausalLM.from_pretrained`
    and `pipeline("text-generation", model=out_dir)` load."""
    merged = merge_stage_states(states, config.n_layer)
    if dtype is not None:
        merged = {k: v.to(dtype) for k, v in merged.items()}
    cfg = hf_config_dict(config, next(iter(merged.values())).dtype)
    out = write_checkpoint(merged, cfg, out_dir, max_shard_bytes=max_shard_bytes)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
         "pad_token_id": config.eos_token_id}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
