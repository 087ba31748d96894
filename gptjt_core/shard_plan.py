"""Which records of a source one shard reads, in what order: pure rules over file and record indices.

Two rules, chosen per source by its number of files (what `datasets` calls shards):
- file-level, when files >= num_shards: shard s reads files s, s + n, s + 2n, ... and every
  record in them, so it reads about 1/n of the source and never opens another shard's files;
- record-level, when a source has fewer files than shards: every shard reads all files and
  keeps the records at epoch positions p with p % n == s (it reads the whole source).

Shuffling (window > 1) is resumable at any document without a shuffle buffer's hidden state:
each epoch permutes the shard's file order (seeded by epoch), and the shard's documents are
emitted in consecutive windows of `window` documents, each window permuted by a seed named by
its epoch and first record's position. A reader restarts a window from its first record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardPlan:
    """The reading plan of one shard of one source."""

    num_files: int  # files of the source, in `datasets`' order
    shard: int
    num_shards: int
    seed: int  # per source, never per shard: record-level shards must agree on the file order
    window: int  # documents shuffled together; 1 keeps file order within files

    @property
    def file_level(self) -> bool:
        """Whether this shard reads only its own files (else it reads all and keeps 1/n)."""
        return self.num_files >= self.num_shards

    def files(self, epoch: int) -> list[int]:
        """File indices this shard reads in `epoch`, in reading order."""
        if self.file_level:
            files = list(range(self.shard, self.num_files, self.num_shards))
        else:
            files = list(range(self.num_files))
        if self.window > 1:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(files))
            files = [files[i] for i in order]
        return files

    def owns(self, position: int) -> bool:
        """Whether the record at `position` (records before it in this epoch's file order) is ours."""
        return self.file_level or position % self.num_shards == self.shard

    def window_order(self, epoch: int, first_position: int, size: int) -> list[int]:
        """The order in which a window of `size` documents is emitted (indices into the window)."""
        if self.window <= 1 or size <= 1:
            return list(range(size))
        return np.random.default_rng([self.seed, epoch, first_position]).permutation(size).tolist()
