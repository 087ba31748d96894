"""Data: sources through `datasets`, a weighted mixture, packing, deterministic shards, cursors.

Vocabulary of this module:
- A *source* is one dataset (hub id or local files). A source with at least num_shards files
  gives shard s its files s, s + n, ... (each shard reads ~1/n of it); one with fewer files
  deals its records, record p of an epoch to shard p % n (each shard reads all of it). See
  `shard_plan`, which also says how shuffling stays resumable.
- A *shard* is an endless stream of packed sequences: sequence k of shard s draws from the
  source the mixture names for k, and is that source's next packed `seq_len` tokens in
  shard s. The pair (shard, offset) therefore names the same tokens on every machine.
- A *cursor* says where a shard stands in a source; resuming from it opens only its file.
- A *ticket* (step, shard, offset) is one micro-batch: sequences offset..offset+mb-1.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from .config import DataConfig, SourceConfig, TrainConfig
from .data_sources import DataError, ReadCounts, open_source
from .shard_plan import ShardPlan

log = logging.getLogger(__name__)
_TOLD_READS_ALL: set[str] = set()  # sources whose record-level rule was logged in this process


@dataclass
class PackCursor:
    """Where a (source, shard) packer stands: resumable from here without reading earlier files.

    The location (file, record, position) is the first document of the current shuffle window;
    a resumed packer reads that window again and skips its first `in_window` documents.
    """

    epoch: int = 0
    file: int = 0  # index into this shard's file order of the epoch (ShardPlan.files)
    record: int = 0  # record index within that file
    position: int = 0  # records before it in the epoch's file order (the record-level rule deals by it)
    in_window: int = 0  # documents of the window already packed, in the window's order
    token_offset: int = 0  # tokens of the next document already packed into earlier sequences
    sequences: int = 0  # packed sequences emitted so far

    @classmethod
    def from_dict(cls, state: dict) -> "PackCursor":
        fields = set(asdict(cls()))
        if set(state) != fields:
            raise ValueError(f"cursor {state} does not have the fields {sorted(fields)}; it was saved by "
                             f"another version of gptjt: start this shard from sequence 0 instead")
        return cls(**state)


class SourcePacker:
    """Packs one source's documents of one shard into `seq_len`-token sequences, EOS between docs.

    Documents do not reset attention: like GPT-J and GPT-JT, a sequence may span documents.
    """

    def __init__(self, source: SourceConfig, shard: int, num_shards: int, seq_len: int,
                 tokenizer, seed: int, shuffle_buffer: int):
        self.source, self.shard, self.num_shards = source, shard, num_shards
        self.seq_len, self.tokenizer, self.seed = seq_len, tokenizer, seed
        self.window_size = max(1, shuffle_buffer)
        self.cursor = PackCursor()
        self.reads = ReadCounts()
        self._plan: ShardPlan | None = None
        self._records: Iterator[tuple[PackCursor, dict]] | None = None  # positioned after the window
        self._window: list[tuple[PackCursor, dict]] | None = None  # in emission order
        self._tokens: list[int] | None = None  # tokens + [eos] of window[in_window]

    def plan(self) -> ShardPlan:
        if self._plan is None:
            opened = open_source(self.source)
            self._plan = ShardPlan(opened.num_files, self.shard, self.num_shards, self.seed, self.window_size)
            if not self._plan.file_level and self.source.name not in _TOLD_READS_ALL:
                _TOLD_READS_ALL.add(self.source.name)
                log.info("source %r has %d file(s) for %d shards: each shard reads all of it and keeps "
                         "every %d-th record; split it into >= %d files to read 1/%d per shard",
                         self.source.name, opened.num_files, self.num_shards, self.num_shards,
                         self.num_shards, self.num_shards)
        return self._plan

    def _read(self, at: PackCursor) -> Iterator[tuple[PackCursor, dict]]:
        """(location, record) of this shard's records in `at.epoch`, from `at`'s location on."""
        plan, opened = self.plan(), open_source(self.source)
        order = plan.files(at.epoch)
        position = at.position
        for i in range(at.file, len(order)):
            start = at.record if i == at.file else 0
            for record, row in enumerate(opened.rows(order[i], start, self.reads), start):
                if plan.owns(position):
                    yield PackCursor(at.epoch, i, record, position), row
                position += 1

    def _text(self, record: dict) -> str:
        try:
            return self.source.text_template.format(**record)
        except KeyError as e:
            raise DataError(f"source {self.source.name!r}: record has no field {e} for template "
                            f"{self.source.text_template!r}; its fields are {sorted(record)}") from None

    def seek(self, cursor: PackCursor) -> None:
        """Resume from `cursor`: opens its file, reads its window again (tokenizes one document)."""
        self.cursor = PackCursor(**asdict(cursor))
        self._records = self._window = self._tokens = None

    def next_sequence(self) -> np.ndarray:
        """The next packed sequence: (seq_len,) int64."""
        out: list[int] = []
        while len(out) < self.seq_len:
            tokens = self._document()
            take = tokens[self.cursor.token_offset: self.cursor.token_offset + self.seq_len - len(out)]
            out += take
            self.cursor.token_offset += len(take)
            if self.cursor.token_offset == len(tokens):  # document finished: on to the next one
                self.cursor.in_window += 1
                self.cursor.token_offset = 0
                self._tokens = None
                if self.cursor.in_window == len(self._window):
                    self._next_window()
        self.cursor.sequences += 1
        return np.asarray(out, dtype=np.int64)

    def _document(self) -> list[int]:
        if self._window is None:  # first use, after a seek, or a new epoch: read the cursor's window
            self._records = self._read(self.cursor)
            if not self._take_window():
                at_start = (self.cursor.file, self.cursor.record, self.cursor.position) == (0, 0, 0)
                if at_start:
                    raise DataError(f"source {self.source.name!r} has no documents for shard {self.shard} "
                                    f"of {self.num_shards}; use fewer shards")
                raise ValueError(f"cursor {self.cursor} points past the end of its epoch of source "
                                 f"{self.source.name!r}; it is not from this data")
            if not 0 <= self.cursor.in_window < len(self._window):
                raise ValueError(f"cursor {self.cursor} points past its window of {len(self._window)} "
                                 f"documents of source {self.source.name!r}; it is not from this data")
        if self._tokens is None:
            _, record = self._window[self.cursor.in_window]
            eos = self.tokenizer.eos_token_id
            self._tokens = self.tokenizer(self._text(record), add_special_tokens=False)["input_ids"] + [eos]
        return self._tokens

    def _next_window(self) -> None:
        """Read the next window now, so the cursor names its first document (a resume then never
        opens a file only to find it finished); at the epoch's end, point at the next epoch."""
        self.cursor.in_window = 0
        if not self._take_window():  # the next epoch starts at its first file, in a new order
            self.cursor = PackCursor(epoch=self.cursor.epoch + 1, sequences=self.cursor.sequences)
            self._records = self._window = None

    def _take_window(self) -> bool:
        """Take the next window from the open reader; False if this epoch has no more documents."""
        docs = list(itertools.islice(self._records, self.window_size))
        if not docs:
            return False
        first = docs[0][0]
        self.cursor.file, self.cursor.record, self.cursor.position = first.file, first.record, first.position
        order = self.plan().window_order(first.epoch, first.position, len(docs))
        self._window = [docs[i] for i in order]
        return True


def mixture_counts(weights: list[float], n: int) -> np.ndarray:
    """How many of the first n sequences each source supplied (see `mixture_sequence`)."""
    return np.bincount(mixture_sequence(weights, n), minlength=len(weights))


def mixture_sequence(weights: list[float], n: int) -> np.ndarray:
    """Source index of sequences 0..n-1: deterministic, and exact in proportion.

    Sequence k goes to the source furthest behind its share, argmax(w_i * (k+1) - count_i)
    (the blending rule Megatron-LM uses), so after any prefix of k sequences every source
    is within one sequence of its weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w))
    out = np.empty(n, dtype=np.int64)
    for k in range(n):
        i = int(np.argmax(w * (k + 1) - counts))
        out[k] = i
        counts[i] += 1
    return out


class ShardReader:
    """Random access to the packed sequences of one shard: `sequence(offset)`.

    Monotone offsets (the normal case) cost one packing step each. Going back re-seeks a
    source to the nearest remembered cursor (one every CURSOR_EVERY sequences) and packs
    forward from there.
    """

    CURSOR_EVERY = 64

    def __init__(self, data: DataConfig, seq_len: int, shard: int, tokenizer, seed: int):
        if not 0 <= shard < data.num_shards:
            raise ValueError(f"shard {shard} is outside [0, {data.num_shards})")
        self.data, self.seq_len, self.shard = data, seq_len, shard
        self.weights = [s.weight for s in data.sources]
        self.packers = [SourcePacker(s, shard, data.num_shards, seq_len, tokenizer,
                                     _mix_seed(seed, s.name), data.shuffle_buffer) for s in data.sources]
        self._blend = np.empty(0, dtype=np.int64)  # source of each offset
        self._source_index = np.empty(0, dtype=np.int64)  # index within that source
        self._cursors: list[dict[int, PackCursor]] = [{0: PackCursor()} for _ in data.sources]

    def _extend_blend(self, n: int) -> None:
        if n <= len(self._blend):
            return
        n = max(n, 2 * len(self._blend), 1024)
        self._blend = mixture_sequence(self.weights, n)
        index = np.zeros(n, dtype=np.int64)
        for i in range(len(self.weights)):
            where = self._blend == i
            index[where] = np.arange(where.sum())
        self._source_index = index

    def source_of(self, offset: int) -> tuple[int, int]:
        """(source index, that source's sequence index) for shard sequence `offset`."""
        self._extend_blend(offset + 1)
        return int(self._blend[offset]), int(self._source_index[offset])

    def sequence(self, offset: int) -> tuple[str, np.ndarray]:
        """(source name, tokens (seq_len,)) of sequence `offset` of this shard."""
        if offset < 0:
            raise ValueError(f"sequence offset must be >= 0, got {offset}")
        i, j = self.source_of(offset)
        packer, cursors = self.packers[i], self._cursors[i]
        if j < packer.cursor.sequences:  # going back: jump to the nearest cursor at or before j
            packer.seek(cursors[max(k for k in cursors if k <= j)])
        while packer.cursor.sequences < j:
            self._remember(i)
            packer.next_sequence()
        self._remember(i)
        return self.data.sources[i].name, packer.next_sequence()

    def _remember(self, i: int) -> None:
        cursor = self.packers[i].cursor
        if cursor.sequences % self.CURSOR_EVERY == 0:
            self._cursors[i].setdefault(cursor.sequences, PackCursor(**asdict(cursor)))

    def state_dict(self) -> dict:
        """Where every source of this shard stands (JSON-serialisable)."""
        return {"shard": self.shard, "cursors": {p.source.name: asdict(p.cursor) for p in self.packers}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` output, taken on this or any other machine."""
        if state.get("shard") != self.shard:
            raise ValueError(f"cursor state is for shard {state.get('shard')}, this reader reads shard {self.shard}")
        for packer in self.packers:
            if packer.source.name not in state["cursors"]:
                raise ValueError(f"cursor state has no source {packer.source.name!r}; "
                                 f"it has {sorted(state['cursors'])}")
            cursor = PackCursor.from_dict(state["cursors"][packer.source.name])
            packer.seek(cursor)
            self._cursors[self.packers.index(packer)][cursor.sequences] = PackCursor(**asdict(cursor))


def _mix_seed(seed: int, *parts: object) -> int:
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def example_seed(seed: int, shard: int, offset: int) -> int:
    """The UL2 transform's seed for a sequence: a function of where it lives, not who runs it."""
    return _mix_seed(seed, "ul2", shard, offset)


@dataclass(frozen=True)
class MicroBatchRef:
    """One micro-batch of a step: `micro_batch` consecutive sequences of one shard."""

    step: int
    index: int  # position within the step, 0..micro_batches_per_step-1
    shard: int
    offset: int  # first sequence offset within the shard


def step_micro_batches(step: int, train: TrainConfig, num_shards: int) -> list[MicroBatchRef]:
    """The canonical micro-batches of `step`: global micro-batch k = step * M + m reads shard
    k % num_shards at offset (k // num_shards) * micro_batch. The local trainer and the
    swarm's ticket ledger both use this, so they see identical data."""
    m_per_step = train.micro_batches_per_step
    refs = []
    for m in range(m_per_step):
        k = step * m_per_step + m
        refs.append(MicroBatchRef(step, m, k % num_shards, (k // num_shards) * train.micro_batch))
    return refs
