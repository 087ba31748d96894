"""The offline GPT-2/GPT-J tokenizer is the real one and round-trips real text."""

from __future__ import annotations

import gzip
import json

from tests.conftest import REPO


def test_known_ids(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256 and len(tokenizer) == 50257


def test_round_trips_bundled_text(tokenizer):
    with gzip.open(REPO / "data" / "demo" / "wiki.jsonl.gz", "rt") as f:
        text = json.loads(f.readline())["text"][:20000]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert 3.0 < len(text) / len(ids) < 6.0  # English BPE: ~4 characters per token
