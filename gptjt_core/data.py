"""Data: sources through `datasets`, a weighted mixture, packing, deterministic shards, cursors.

Vocabulary of this module:
- A *source* is one dataset (hub id or local files). Its documents are dealt to shards by
  stream position: document i of an epoch belongs to shard i % num_shards.
- A *shard* is an endless stream of packed sequences: sequence k of shard s draws from the
  source the mixture names for k, and is that source's next packed `seq_len` tokens in
  shard s. The pair (shard, offset) therefore names the same tokens on every machine.
- A *ticket* (step, shard, offset) is one micro-batch: sequences offset..offset+mb-1.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig, SourceConfig, TrainConfig

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


class DataError(RuntimeError):
    """A source cannot be read or a record cannot be turned into a document."""


def _local_files(path: str) -> list[str] | None:
    """Local files named by `path` (file, directory or glob), or None if it is not local."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if _format_of(str(f)))
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(str(p), recursive=True))
    elif p.is_file():
        files = [str(p)]
    elif path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1 or _format_of(path):
        raise DataError(f"data file {path!r} does not exist; fix the source path in the run config")
    else:
        return None
    if not files:
        raise DataError(f"no data files match {path!r}")
    return files


def _format_of(name: str) -> str | None:
    stem = name[:-3] if name.endswith(".gz") else name
    return _FORMATS.get(Path(stem).suffix)


def open_source(source: SourceConfig):
    """The source as a `datasets` streaming IterableDataset (local files and hub ids alike)."""
    import datasets

    files = _local_files(source.path)
    try:
        if files is not None:
            formats = {_format_of(f) for f in files}
            if len(formats) != 1 or None in formats:
                raise DataError(f"source {source.name!r}: files {files[:3]} must share one format "
                                f"of {sorted(set(_FORMATS))} (optionally .gz)")
            return datasets.load_dataset(formats.pop(), data_files=files, split="train", streaming=True)
        return datasets.load_dataset(source.path, source.hub_config or None, split=source.split,
                                     streaming=True)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot open source {source.name!r} ({source.path}): {e}") from e


@dataclass
class PackCursor:
    """Where a (source, shard) packer stands: resumable, serialisable."""

    epoch: int = 0
    doc_position: int = 0  # stream position (in the epoch) of the next document to read
    token_offset: int = 0  # tokens of that document already packed into earlier sequences
    sequences: int = 0  # packed sequences emitted so far


class SourcePacker:
    """Packs one source's documents of one shard into `seq_len`-token sequences, EOS between docs.

    Documents do not reset attention: like GPT-J and GPT-JT, a sequence may span documents.
    """

    def __init__(self, source: SourceConfig, shard: int, num_shards: int, seq_len: int,
                 tokenizer, seed: int, shuffle_buffer: int):
        self.source, self.shard, self.num_shards = source, shard, num_shards
        self.seq_len, self.tokenizer, self.seed = seq_len, tokenizer, seed
        self.shuffle_buffer = shuffle_buffer
        self._dataset = None
        self.cursor = PackCursor()
        self._docs: Iterator[tuple[int, list[int]]] | None = None
        self._pending: list[int] = []  # tokens of the current document not yet packed
        self._pending_position = 0

    def _stream(self, epoch: int, start: int) -> Iterator[tuple[int, list[int]]]:
        """(position, tokens + [eos]) of this shard's documents in `epoch`, from `start` on."""
        if self._dataset is None:
            self._dataset = open_source(self.source)
        ds = self._dataset
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        eos = self.tokenizer.eos_token_id
        for position, record in enumerate(ds):
            if position % self.num_shards != self.shard or position < start:
                continue
            yield position, self.tokenizer(self._text(record), add_special_tokens=False)["input_ids"] + [eos]

    def _text(self, record: dict) -> str:
        try:
            return self.source.text_template.format(**record)
        except KeyError as e:
            raise DataError(f"source {self.source.name!r}: record has no field {e} for template "
                            f"{self.source.text_template!r}; its fields are {sorted(record)}") from None

    def seek(self, cursor: PackCursor) -> None:
        """Resume from `cursor` (re-reads the stream up to it; tokenizes only one document)."""
        self.cursor = PackCursor(**asdict(cursor))
        self._docs = None
        self._pending = []

    def next_sequence(self) -> np.ndarray:
        """The next packed sequence: (seq_len,) int64."""
        out: list[int] = []
        while len(out) < self.seq_len:
            if not self._pending:
                self._next_document()
            take = self._pending[: self.seq_len - len(out)]
            out += take
            self._pending = self._pending[len(take):]
            self.cursor.token_offset += len(take)
            if not self._pending:  # document finished: the cursor moves to the next one
                self.cursor.doc_position = self._pending_position + 1
                self.cursor.token_offset = 0
        self.cursor.sequences += 1
        return np.asarray(out, dtype=np.int64)

    def _next_document(self) -> None:
        empty_epochs = 0
        while True:
            if self._docs is None:
                self._docs = self._stream(self.cursor.epoch, self.cursor.doc_position)
            try:
                position, tokens = next(self._docs)
            except StopIteration:
                if self.cursor.doc_position == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise DataError(f"source {self.source.name!r} has no documents for shard "
                                        f"{self.shard} of {self.num_shards}; use fewer shards") from None
                self.cursor.epoch += 1  # wrap: the next epoch reshuffles (if shuffling)
                self.cursor.doc_position = 0
                self.cursor.token_offset = 0
                self._docs = None
                continue
            self._pending_position = position
            self._pending = tokens[self.cursor.token_offset:] if position == self.cursor.doc_position else tokens
            if position != self.cursor.doc_position:
                self.cursor.doc_position, self.cursor.token_offset = position, 0
            if self._pending:
                return


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
            cursor = PackCursor(**state["cursors"][packer.source.name])
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
