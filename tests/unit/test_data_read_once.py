"""Data read once: with a multi-file source each shard reads only its own files, the shards together
read the source exactly once, and a resumed reader opens no earlier file and yields no earlier record."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from gptjt_core.config import DataConfig, SourceConfig
from gptjt_core.data import DataError, PackCursor, ShardReader

SEQ = 48
FILES, DOCS_PER_FILE, SHARDS = 16, 30, 8


def write_files(folder: Path, files: int = FILES, docs: int = DOCS_PER_FILE) -> str:
    """`files` JSONL files of `docs` documents '<m-ID> words...' each, IDs unique over the source."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for f in range(files):
        lines = []
        for i in range(docs):
            words = " ".join(["alpha", "beta", "gamma", "delta"][j % 4] for j in range(rng.integers(5, 80)))
            lines.append(json.dumps({"body": f" <m-{f * 1000 + i}> {words}"}))
        (folder / f"part-{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "*.jsonl")


def config(path: str, num_shards: int, shuffle_buffer: int) -> DataConfig:
    return DataConfig(sources=[SourceConfig("m", path, 1.0, "{body}")], num_shards=num_shards,
                      shuffle_buffer=shuffle_buffer)


def bytes_read_by_this_process() -> int:
    """Bytes this process got from read() calls so far (the kernel's count, not ours)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def one_epoch(reader: ShardReader, tokenizer) -> tuple[list[str], int]:
    """(document IDs of the epoch the reader's sequence 0 starts, in packing order; the number of
    sequences up to and including the one in which that epoch ends)."""
    epoch = reader.packers[0].cursor.epoch
    tokens: list[np.ndarray] = []
    while reader.packers[0].cursor.epoch == epoch:  # the cursor turns to the next epoch as its last doc ends
        tokens.append(reader.sequence(len(tokens))[1])
    flat = np.concatenate(tokens)
    ends = np.flatnonzero(flat == tokenizer.eos_token_id)
    docs = np.split(flat[: ends[-1] + 1], ends[:-1] + 1)
    ids = [re.search(r"<(m-\d+)>", tokenizer.decode(d)).group(1) for d in docs]
    this_epoch = list(itertools.takewhile(lambda i, seen=set(): not (i in seen or seen.add(i)), ids))
    return this_epoch, len(tokens)  # (the next epoch starts with a document seen in this one)


def bytes_to_read(reader: ShardReader, sequences: int) -> int:
    """Bytes `reader` reads for its sequences 0..sequences-1."""
    before = bytes_read_by_this_process()
    for k in range(sequences):
        reader.sequence(k)
    return bytes_read_by_this_process() - before


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes with Linux's /proc")


@needs_proc
@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_eight_shards_each_read_an_eighth_and_together_read_the_source_once(tmp_path, tokenizer,
                                                                           shuffle_buffer):
    path = write_files(tmp_path / "m")
    single = lambda: ShardReader(config(path, 1, shuffle_buffer), SEQ, 0, tokenizer, seed=4)  # noqa: E731
    single().sequence(0)  # opens the source once for this process (it reads part of file 0) and imports
    single_ids, n = one_epoch(single(), tokenizer)
    # The sequence in which an epoch ends usually starts the next one (it reopens that epoch's
    # first file), so bytes are counted up to the sequence before it: all of the epoch's files
    # have been read by then.
    single_bytes = bytes_to_read(single(), n - 1)
    union: Counter = Counter()
    shares = []
    for shard in range(SHARDS):
        reader = ShardReader(config(path, SHARDS, shuffle_buffer), SEQ, shard, tokenizer, seed=4)
        ids, n = one_epoch(reader, tokenizer)
        union.update(ids)
        assert set(reader.packers[0].reads.files) == {shard, shard + SHARDS}, "it opened another shard's file"
        reader = ShardReader(config(path, SHARDS, shuffle_buffer), SEQ, shard, tokenizer, seed=4)
        read = bytes_to_read(reader, n - 1)
        reads = reader.packers[0].reads  # each own file opened once; the last record may wait for sequence n
        assert reads.files == Counter({shard: 1, shard + SHARDS: 1})
        assert 2 * DOCS_PER_FILE - 1 <= reads.records <= 2 * DOCS_PER_FILE
        own = sum(os.path.getsize(tmp_path / "m" / f"part-{f:02d}.jsonl") for f in (shard, shard + SHARDS))
        assert own <= read <= own + 4096, (read, own)  # its own two files, read once, and nothing else
        shares.append(read / single_bytes)
    every_doc = Counter(f"m-{f * 1000 + i}" for f in range(FILES) for i in range(DOCS_PER_FILE))
    assert Counter(single_ids) == every_doc and union == every_doc
    print(f"bytes read per shard / single reader's {single_bytes}: {[round(s, 3) for s in shares]}")
    assert all(0.08 < s < 0.2 for s in shares), shares  # 2 of 16 equal files: 0.125


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_shards_are_deterministic_and_shuffles_differ_by_epoch(tmp_path, tokenizer, shuffle_buffer):
    data = config(write_files(tmp_path / "m"), SHARDS, shuffle_buffer)
    forward = ShardReader(data, SEQ, 3, tokenizer, seed=2)
    a = [forward.sequence(k)[1] for k in range(60)]
    b = ShardReader(data, SEQ, 3, tokenizer, seed=2)  # "another machine", jumping back and forth
    assert all((b.sequence(k)[1] == a[k]).all() for k in (59, 30, 2, 45, 0, 12))
    first, _ = one_epoch(ShardReader(data, SEQ, 3, tokenizer, seed=2), tokenizer)
    from_epoch_one = ShardReader(data, SEQ, 3, tokenizer, seed=2)
    from_epoch_one.load_state_dict({"shard": 3, "cursors": {"m": asdict(PackCursor(epoch=1))}})
    second, _ = one_epoch(from_epoch_one, tokenizer)
    assert sorted(first) == sorted(second) and (first != second) == bool(shuffle_buffer)


@needs_proc
@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_resume_opens_no_earlier_file_and_yields_no_earlier_record(tmp_path, tokenizer, shuffle_buffer):
    data = config(write_files(tmp_path / "m"), 2, shuffle_buffer)  # 8 files per shard
    reader = ShardReader(data, SEQ, 1, tokenizer, seed=6)
    for k in range(70):  # past the shard's first file (~30 sequences per file)
        reader.sequence(k)
    state = json.loads(json.dumps(reader.state_dict()))
    cursor = state["cursors"]["m"]
    records_then, opened_then = reader.packers[0].reads.records, set(reader.packers[0].reads.files)
    before = bytes_read_by_this_process()
    expected = [reader.sequence(k)[1] for k in range(70, 130)]
    uninterrupted_bytes = bytes_read_by_this_process() - before
    records_after = reader.packers[0].reads.records - records_then

    resumed = ShardReader(data, SEQ, 1, tokenizer, seed=6)
    resumed.load_state_dict(state)
    before = bytes_read_by_this_process()
    assert all((resumed.sequence(70 + i)[1] == e).all() for i, e in enumerate(expected))
    resumed_bytes = bytes_read_by_this_process() - before
    reads = resumed.packers[0].reads
    order = resumed.packers[0].plan().files(cursor["epoch"])
    assert cursor["file"] >= 1 and cursor["record"] > 0, cursor
    assert not set(reads.files) & set(order[: cursor["file"]]), "resume opened a file it had finished"
    # It yields the cursor's window again (the one document being packed when unshuffled), and no
    # record before the window; the records of the cursor's file before it, `datasets` parses to skip.
    assert reads.records == records_after + (8 if shuffle_buffer else 1)
    # Bytes: besides what the uninterrupted reader read, only the files it had open (the cursor's
    # file, and any later one its shuffle window reaches into) are read again, whole.
    reopened = set(reads.files) & opened_then
    assert order[cursor["file"]] in reopened and reopened <= set(order[cursor["file"]: cursor["file"] + 2])
    reread = sum(os.path.getsize(_file(data, f)) for f in reopened)
    print(f"resume read {resumed_bytes} bytes; uninterrupted {uninterrupted_bytes} + reopened files {reread}")
    assert resumed_bytes <= uninterrupted_bytes + reread + 4096


def _file(data: DataConfig, index: int) -> str:
    return sorted(Path(data.sources[0].path).parent.glob("*.jsonl"))[index]


def test_fewer_files_than_shards_deals_records_and_says_so(tmp_path, tokenizer, caplog):
    path = write_files(tmp_path / "m", files=3, docs=20)
    seen = []
    with caplog.at_level("INFO", logger="gptjt_core.data"):
        for shard in range(SHARDS):
            reader = ShardReader(config(path, SHARDS, 0), SEQ, shard, tokenizer, seed=0)
            ids, _ = one_epoch(reader, tokenizer)
            assert set(reader.packers[0].reads.files) == {0, 1, 2}  # reads everything, keeps 1/8
            seen += ids
    assert sorted(seen) == sorted(f"m-{f * 1000 + i}" for f in range(3) for i in range(20))
    assert "reads all of it and keeps every 8-th record" in caplog.text


def test_unreadable_file_and_old_cursor_fail_clearly(tmp_path, tokenizer):
    path = write_files(tmp_path / "m", files=4, docs=5)
    (tmp_path / "m" / "part-02.jsonl").write_text('{"body": "fine"}\n{not json\n')
    reader = ShardReader(config(path, 2, 0), SEQ, 0, tokenizer, seed=0)
    with pytest.raises(DataError, match=r"cannot read .*part-02\.jsonl.*fix or remove that file"):
        for k in range(40):
            reader.sequence(k)
    with pytest.raises(ValueError, match="doc_position.*start this shard from sequence 0"):
        reader.load_state_dict({"shard": 0, "cursors": {"m": {"epoch": 0, "doc_position": 3,
                                                              "token_offset": 0, "sequences": 9}}})
