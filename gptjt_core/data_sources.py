"""Sources through `datasets`: local files or hub ids, opened once per process, read one file at a time."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .mixture_config import SourceConfig

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


@dataclass
class ReadCounts:
    """What a reader pulled out of `datasets`: the honest measure of how much it read."""

    records: int = 0  # records `datasets` yielded to us (skipped ones inside a file not counted)
    files: Counter = field(default_factory=Counter)  # file index -> times opened


@dataclass
class OpenSource:
    """A source as a streaming `datasets.IterableDataset` whose shards are its files."""

    name: str
    dataset: object  # datasets.IterableDataset, streaming
    files: list[str] | None  # local file names in `datasets`' order; None for a hub id

    @property
    def num_files(self) -> int:
        """Files of the source: `datasets` calls them shards and never splits one."""
        return self.dataset.num_shards

    def file_name(self, index: int) -> str:
        return self.files[index] if self.files else f"data file {index} of {self.num_files}"

    def rows(self, index: int, start: int, counts: ReadCounts) -> Iterator[dict]:
        """Records of file `index` from record `start` on. Only that file is opened; `datasets`
        still parses its first `start` records to skip them (a JSON line has no index)."""
        ds = self.dataset.shard(num_shards=self.num_files, index=index, contiguous=True)
        if start:
            ds = ds.skip(start)
        counts.files[index] += 1
        try:
            for row in ds:
                counts.records += 1
                yield row
        except Exception as e:
            raise DataError(f"source {self.name!r}: cannot read {self.file_name(index)}: {e}; "
                            f"fix or remove that file (every machine must see the same files)") from e


_OPENED: dict[tuple, OpenSource] = {}  # one per source per process: opening reads a block (below)


def open_source(source: SourceConfig) -> OpenSource:
    """The source through `datasets` (local files and hub ids alike), opened once per process:
    `load_dataset` reads the first block of the first file to infer the record's fields."""
    files = _local_files(source.path)
    key = (source.name, source.path, source.hub_config, source.split, tuple(files or ()))
    if key not in _OPENED:
        _OPENED[key] = OpenSource(source.name, _load(source, files), files)
    return _OPENED[key]


def _load(source: SourceConfig, files: list[str] | None):
    import datasets

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
