"""Held-out perplexity and greedy generation with a whole-model stage."""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import DataConfig
from .data import ShardReader
from .model import GPTJStage
from .ul2 import sequence_losses


@torch.no_grad()
def perplexity(model: GPTJStage, data: DataConfig, tokenizer, seq_len: int, max_sequences: int,
               batch_size: int = 4) -> dict[str, float]:
    """Causal perplexity over the first `max_sequences` packed sequences of `data.heldout`.

    Held-out sources are read as one shard, unshuffled, each document once (no wrap).
    """
    if not data.heldout:
        raise ValueError("no held-out sources configured (data.heldout); add one to measure perplexity")
    heldout = DataConfig(sources=data.heldout, tokenizer=data.tokenizer, num_shards=1, shuffle_buffer=0)
    reader = ShardReader(heldout, seq_len, shard=0, tokenizer=tokenizer, seed=0)
    sequences = []
    for offset in range(max_sequences):
        _, tokens = reader.sequence(offset)
        if any(p.cursor.epoch > 0 for p in reader.packers):
            break  # ran out of held-out text: never score a document twice
        sequences.append(tokens)
    if not sequences:
        raise ValueError(f"held-out data is shorter than one sequence of {seq_len} tokens")
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        ids = torch.from_numpy(np.stack(sequences[i:i + batch_size])).to(device)
        logits = model(ids, torch.zeros(len(ids), dtype=torch.long, device=device))
        per_seq = sequence_losses(logits, ids)  # every position is a target
        total_nll += float(per_seq.sum()) * (seq_len - 1)
        total_tokens += len(ids) * (seq_len - 1)
    mean = total_nll / total_tokens
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "sequences": len(sequences)}


@torch.no_grad()
def generate(model: GPTJStage, tokenizer, prompt: str, max_new_tokens: int = 24,
             prefix_lm: bool = True) -> str:
    """Greedy continuation of `prompt`. With `prefix_lm`, the prompt is read bidirectionally
    (the way GPT-JT was trained with UL2); without, plainly causally (as HF generate does)."""
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("prompt is empty after tokenization")
    prefix = len(ids) if prefix_lm else 0
    out = list(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([out], device=device)
        logits = model(x, torch.tensor([prefix], device=device))
        nxt = int(logits[0, -1, : len(tokenizer)].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
    return tokenizer.decode(out[len(ids):])
