"""Data: mixture proportions, packing, deterministic and disjoint shards, cursors, errors."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest

from gptjt_core.config import DataConfig, SourceConfig, TrainConfig
from gptjt_core.data import (DataError, ShardReader, mixture_counts, mixture_sequence,
                             step_micro_batches)

SEQ = 48


def write_source(path, name: str, n_docs: int, gz: bool = False):
    """Documents 'name-i: w w w ...' of varied length, one JSON record per line."""
    rng = np.random.default_rng(len(name))
    lines = []
    for i in range(n_docs):
        words = " ".join(["alpha", "beta", "gamma", "delta"][j % 4] for j in range(rng.integers(5, 60)))
        lines.append(json.dumps({"body": f" <{name}-{i}> {words}", "n": i}))
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


@pytest.fixture()
def two_sources(tmp_path):
    a = write_source(tmp_path / "a.jsonl", "a", 40)
    b = write_source(tmp_path / "b.jsonl.gz", "b", 30, gz=True)
    return DataConfig(sources=[SourceConfig("a", a, 0.75, "{body}"), SourceConfig("b", b, 0.25, "{body}")],
                      num_shards=3, shuffle_buffer=0)


def doc_ids(tokenizer, tokens) -> list[str]:
    return re.findall(r"<(\w-\d+)>", tokenizer.decode(tokens))


def test_mixture_is_exact_and_deterministic():
    w = [0.55, 0.2, 0.2, 0.05]
    for n in (20, 100, 1000, 5000):
        counts = mixture_counts(w, n)
        assert np.all(np.abs(counts - np.array(w) * n) <= 1.0), (n, counts)
    assert (mixture_sequence(w, 500) == mixture_sequence(w, 500)).all()


def test_reader_proportions_follow_weights(two_sources, tokenizer):
    reader = ShardReader(two_sources, SEQ, 0, tokenizer, seed=1)
    names = [reader.sequence(k)[0] for k in range(80)]
    assert abs(names.count("a") - 60) <= 1 and abs(names.count("b") - 20) <= 1


def test_sequences_are_full_and_documents_are_eos_separated(two_sources, tokenizer):
    reader = ShardReader(two_sources, SEQ, 1, tokenizer, seed=1)
    seqs = [reader.sequence(k)[1] for k in range(30)]
    assert all(s.shape == (SEQ,) and s.dtype == np.int64 for s in seqs)
    assert sum(int((s == tokenizer.eos_token_id).sum()) for s in seqs) > 5


def test_shards_are_deterministic_across_readers_and_access_order(two_sources, tokenizer):
    first = ShardReader(two_sources, SEQ, 2, tokenizer, seed=5)
    forward = [first.sequence(k)[1] for k in range(25)]
    second = ShardReader(two_sources, SEQ, 2, tokenizer, seed=5)  # "another machine"
    backward = {k: second.sequence(k)[1] for k in reversed(range(25))}
    assert all((forward[k] == backward[k]).all() for k in range(25))
    # and random jumps back and forth on the same reader
    for k in (3, 20, 0, 24, 7):
        assert (first.sequence(k)[1] == forward[k]).all()


def test_shards_are_disjoint_and_cover_every_document_once_per_epoch(two_sources, tokenizer):
    seen: dict[int, set[str]] = {}
    for shard in range(3):
        reader = ShardReader(two_sources, SEQ, shard, tokenizer, seed=0)
        ids: list[str] = []
        k = 0
        while all(p.cursor.epoch == 0 for p in reader.packers) or k < 5:
            name, tokens = reader.sequence(k)
            if any(p.cursor.epoch > 0 for p in reader.packers):
                break
            ids += doc_ids(tokenizer, tokens)
            k += 1
        seen[shard] = set(ids)
        for doc in ids:
            source, index = doc.split("-")
            assert int(index) % 3 == shard, f"{doc} read by shard {shard}"
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_cursor_resumes_exactly_on_a_fresh_reader(two_sources, tokenizer):
    reader = ShardReader(two_sources, SEQ, 0, tokenizer, seed=3)
    for k in range(17):
        reader.sequence(k)
    state = json.loads(json.dumps(reader.state_dict()))  # survives serialisation
    expected = [reader.sequence(k)[1] for k in range(17, 40)]
    fresh = ShardReader(two_sources, SEQ, 0, tokenizer, seed=3)
    fresh.load_state_dict(state)
    assert all((fresh.sequence(17 + i)[1] == e).all() for i, e in enumerate(expected))
    with pytest.raises(ValueError, match="shard 0"):
        ShardReader(two_sources, SEQ, 1, tokenizer, seed=3).load_state_dict(state)


def test_sources_wrap_into_a_new_epoch(tmp_path, tokenizer):
    small = write_source(tmp_path / "s.jsonl", "s", 4)
    data = DataConfig(sources=[SourceConfig("s", small, 1.0, "{body}")], num_shards=1, shuffle_buffer=0)
    reader = ShardReader(data, SEQ, 0, tokenizer, seed=0)
    for k in range(40):
        reader.sequence(k)
    assert reader.packers[0].cursor.epoch >= 2


def test_shuffled_epochs_differ_but_stay_deterministic(tmp_path, tokenizer):
    src = write_source(tmp_path / "s.jsonl", "s", 50)
    data = DataConfig(sources=[SourceConfig("s", src, 1.0, "{body}")], num_shards=1, shuffle_buffer=16)
    a = [ShardReader(data, SEQ, 0, tokenizer, seed=9).sequence(k)[1] for k in range(1)]
    b = [ShardReader(data, SEQ, 0, tokenizer, seed=9).sequence(k)[1] for k in range(1)]
    assert (a[0] == b[0]).all()
    unshuffled = DataConfig(sources=[SourceConfig("s", src, 1.0, "{body}")], num_shards=1, shuffle_buffer=0)
    assert doc_ids(tokenizer, ShardReader(unshuffled, SEQ, 0, tokenizer, 9).sequence(0)[1])[0] == "s-0"


def test_step_micro_batches_is_a_partition_of_every_shard():
    train = TrainConfig(global_batch=12, micro_batch=2, seq_len=64, steps=10)
    seen = set()
    for step in range(10):
        refs = step_micro_batches(step, train, num_shards=4)
        assert len(refs) == 6 and [r.index for r in refs] == list(range(6))
        for r in refs:
            for o in range(r.offset, r.offset + 2):
                assert (r.shard, o) not in seen
                seen.add((r.shard, o))
    for shard in range(4):  # every shard is read contiguously from offset 0
        offsets = sorted(o for s, o in seen if s == shard)
        assert offsets == list(range(len(offsets)))


def test_bad_sources_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        ShardReader(DataConfig(sources=[SourceConfig("x", str(tmp_path / "missing.jsonl"), 1.0)],
                               num_shards=1), SEQ, 0, tokenizer, 0).sequence(0)
    src = write_source(tmp_path / "a.jsonl", "a", 3)
    with pytest.raises(DataError, match="no field 'text'.*body"):
        ShardReader(DataConfig(sources=[SourceConfig("a", src, 1.0)], num_shards=1),
                    SEQ, 0, tokenizer, 0).sequence(0)
    with pytest.raises(DataError, match="no documents for shard 5"):
        ShardReader(DataConfig(sources=[SourceConfig("a", src, 1.0, "{body}")], num_shards=8),
                    SEQ, 5, tokenizer, 0).sequence(0)
    with pytest.raises(ValueError, match="shard 9"):
        ShardReader(DataConfig(sources=[SourceConfig("a", src, 1.0)], num_shards=2), SEQ, 9, tokenizer, 0)


def test_text_and_parquet_sources(tmp_path, tokenizer):
    (tmp_path / "t.txt").write_text("one line of text\nanother line\n" * 20)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(50)]}), tmp_path / "p.parquet")
    data = DataConfig(sources=[SourceConfig("t", str(tmp_path / "t.txt"), 1.0),
                               SourceConfig("p", str(tmp_path / "p.parquet"), 1.0)],
                      num_shards=1, shuffle_buffer=0)
    reader = ShardReader(data, 16, 0, tokenizer, 0)
    texts = {reader.sequence(k)[0]: tokenizer.decode(reader.sequence(k)[1]) for k in range(4)}
    assert "line" in texts["t"] and "parquet row" in texts["p"]
