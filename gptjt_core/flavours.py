"""Model flavours: Hugging Face GPTJConfig keyword arguments of GPT-J 6B and its tiny debug twin."""

from __future__ import annotations

from typing import Any

from .config_errors import ConfigError

# EleutherAI/gpt-j-6b's config.json, field for field. 50400 embeddings for 50257 GPT-2
# BPE tokens: the table was padded to a multiple of 8 x TPU cores for speed; ids
# 50257..50399 are never produced by the tokenizer.
GPTJ_6B = {
    "vocab_size": 50400,
    "n_positions": 2048,
    "n_embd": 4096,
    "n_layer": 28,
    "n_head": 16,
    "rotary_dim": 64,
    "n_inner": None,  # None means 4 * n_embd = 16384
    "activation_function": "gelu_new",
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "tie_word_embeddings": False,
}

# The debug flavour every test and the demo run: GPT-J's exact architecture and its real
# vocabulary (so the demo reads real text), shrunk in depth and width. ~13.7M parameters,
# most of them in the 50400-row embedding and LM head.
TINY = {
    **GPTJ_6B,
    "n_embd": 128,
    "n_layer": 4,
    "n_head": 4,
    "rotary_dim": 16,  # partial rotary like GPT-J: 16 of each head's 32 dims
    "n_inner": 512,
}

FLAVOURS: dict[str, dict[str, Any]] = {"gptj-6b": GPTJ_6B, "tiny": TINY}


def flavour_config(name: str) -> dict[str, Any]:
    """Return a copy of the GPTJConfig kwargs of flavour `name` ('gptj-6b' or 'tiny')."""
    if name not in FLAVOURS:
        raise ConfigError(f"unknown model flavour {name!r}; choose one of {sorted(FLAVOURS)}")
    return dict(FLAVOURS[name])
