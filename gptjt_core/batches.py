"""Micro-batch tensors from (shard, offset): packed sequences through the UL2 transform."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import RunConfig
from .data import MicroBatchRef, ShardReader, example_seed
from .tokenizer import load_tokenizer
from .ul2 import UL2Transform


@dataclass
class MicroBatch:
    """What a pipeline's first stage consumes and its last stage scores."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE outside targets
    prefix_lengths: torch.Tensor  # (B,) int64
    sources: list[str]  # source name per sequence
    modes: list[str]  # UL2 mode per sequence

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


class MicroBatchBuilder:
    """Builds the micro-batch of a ref on any machine, identically (shard readers are cached)."""

    def __init__(self, run: RunConfig, ul2: bool = True):
        self.run = run
        self.tokenizer = load_tokenizer(run.data.tokenizer)
        self.transform = UL2Transform.from_tokenizer(run.ul2, self.tokenizer) if ul2 else None
        self._readers: dict[int, ShardReader] = {}

    def reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.run.data, self.run.train.seq_len, shard,
                                               self.tokenizer, self.run.train.seed)
        return self._readers[shard]

    def build(self, ref: MicroBatchRef) -> MicroBatch:
        ids, labels, prefixes, sources, modes = [], [], [], [], []
        for offset in range(ref.offset, ref.offset + self.run.train.micro_batch):
            source, tokens = self.reader(ref.shard).sequence(offset)
            if self.transform is None:  # plain causal LM on the packed tokens
                ids.append(tokens)
                labels.append(tokens)
                prefixes.append(0)
                modes.append("causal")
            else:
                ex = self.transform(tokens, example_seed(self.run.train.seed, ref.shard, offset))
                ids.append(ex.input_ids)
                labels.append(ex.labels)
                prefixes.append(ex.prefix_length)
                modes.append(ex.mode)
            sources.append(source)
        return MicroBatch(torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(labels)),
                          torch.tensor(prefixes, dtype=torch.long), sources, modes)
