"""Held-out perplexity and greedy generation with a whole-model stage."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .batches import MicroBatchBuilder
from .config import DataConfig, RunConfig
from .data import MicroBatchRef, ShardReader
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
def heldout_objective_loss(model: GPTJStage, run: RunConfig, max_sequences: int, micro_batch: int = 8) -> dict:
    """The run's training objective on `data.heldout`: the mean per-sequence loss (batch_loss's
    measure) over its first `max_sequences` packed sequences, each put through the UL2 denoisers
    as a train step would (seeded by its offset, so two models are scored on the same examples).

    Beside `perplexity` (plain causal): a model trained with UL2 is scored on the task it
    learned. On the tiny flavour at bench gradsync's settings the two disagree: over 321 steps
    the UL2 loss falls to ~6.6 while the causal loss of the training text itself rises to ~9.4
    (from ~7.4 at step 99). Held-out sources are read as one shard, unshuffled, each document once.
    """
    if not run.data.heldout:
        raise ValueError("no held-out sources configured (data.heldout); add one to score the model on them")
    data = DataConfig(sources=run.data.heldout, tokenizer=run.data.tokenizer, num_shards=1, shuffle_buffer=0)
    train = dataclasses.replace(run.train, micro_batch=micro_batch, global_batch=micro_batch)  # (checked together)
    builder = MicroBatchBuilder(dataclasses.replace(run, data=data, train=train))
    model.eval()
    device = next(model.parameters()).device
    total, sequences = 0.0, 0
    for offset in range(0, max_sequences - micro_batch + 1, micro_batch):
        mb = builder.build(MicroBatchRef(step=0, index=0, shard=0, offset=offset))
        if any(p.cursor.epoch > 0 for p in builder.reader(0).packers):
            break  # ran out of held-out text: never score a document twice
        logits = model(mb.input_ids.to(device), mb.prefix_lengths.to(device))
        total += float(sequence_losses(logits, mb.labels.to(device)).sum())
        sequences += len(mb.input_ids)
    if not sequences:
        raise ValueError(f"held-out data is shorter than {micro_batch} sequences of {run.train.seq_len} tokens")
    return {"loss": total / sequences, "sequences": sequences}


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
