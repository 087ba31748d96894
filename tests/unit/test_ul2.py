"""UL2: the prefix-LM mask and the denoisers' statistics, determinism and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptjt_core.config import DenoiserConfig, UL2Config
from gptjt_core.ul2 import IGNORE, UL2Transform, batch_loss, prefix_lm_mask, sequence_losses

EOS = 50256
MODES = {"S2S": [58, 50, 17, 60], "NLG": [58, 45, 43, 60], "NLU": [58, 45, 52, 60]}  # 4 ids each


def test_mask_semantics():
    m = prefix_lm_mask(torch.tensor([0, 3, 6]), 6)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    assert torch.equal(m[0], causal)
    expected = causal.clone()
    expected[:3, :3] = True  # bidirectional prefix
    assert torch.equal(m[1], expected)
    assert m[2].all()  # whole sequence is prefix
    # the model card's picture: prefix 3 of 5
    card = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(prefix_lm_mask(torch.tensor([3]), 5)[0], card.bool())


@pytest.mark.parametrize("bad", [torch.tensor([7]), torch.tensor([-1]), torch.tensor([[1]])])
def test_mask_rejects_bad_prefix_lengths(bad):
    with pytest.raises(ValueError):
        prefix_lm_mask(bad, 6)


def packed(seq_len: int, seed: int) -> np.ndarray:
    # Ordinary token ids that never collide with sentinels (eos-100 .. eos-21).
    return np.random.default_rng(seed).integers(1000, 40000, size=seq_len)


def transform(denoisers=None) -> UL2Transform:
    cfg = UL2Config(denoisers=denoisers) if denoisers else UL2Config()
    return UL2Transform(cfg, EOS, MODES)


def split_targets(ex, sentinels: set[int]) -> list[list[int]]:
    """Target part -> list of spans (tokens after each sentinel)."""
    spans = []
    for tok in ex.labels[ex.prefix_length:]:
        if tok == IGNORE:
            break
        if int(tok) in sentinels:
            spans.append([])
        else:
            spans[-1].append(int(tok))
    return spans


def test_outputs_have_fixed_length_labels_only_on_targets_and_are_deterministic():
    t = transform()
    for seed in range(200):
        tokens = packed(256, seed)
        ex = t(tokens, seed)
        assert ex.input_ids.shape == ex.labels.shape == (256,)
        assert (ex.labels[: ex.prefix_length] == IGNORE).all()
        targets = ex.labels != IGNORE
        assert targets.any()
        # labels equal the inputs wherever they are set (aligned, HF style)
        assert (ex.labels[targets] == ex.input_ids[targets]).all()
        assert ex.input_ids[: len(MODES[ex.mode])].tolist() == MODES[ex.mode]
        again = t(tokens, seed)
        assert again.mode == ex.mode and (again.input_ids == ex.input_ids).all()
        assert again.prefix_length == ex.prefix_length


def test_mode_frequencies_follow_the_mix():
    t = transform()
    counts = {"S2S": 0, "NLG": 0, "NLU": 0}
    n = 4000
    for seed in range(n):
        counts[t(packed(64, 0), seed).mode] += 1
    assert abs(counts["S2S"] / n - 0.5) < 0.03
    assert abs(counts["NLG"] / n - 0.25) < 0.03
    assert abs(counts["NLU"] / n - 0.25) < 0.03


def test_prefix_mode_split_is_uniform_and_text_is_kept_in_order():
    t = transform([DenoiserConfig("S2S", 1.0, "prefix", "[S2S]")])
    splits = []
    for seed in range(3000):
        tokens = packed(128, seed)
        ex = t(tokens, seed)
        assert ex.input_ids[4:].tolist() == tokens[:124].tolist()
        splits.append(ex.prefix_length - 4)
    splits = np.array(splits)
    assert splits.min() >= 1 and splits.max() <= 123
    assert abs(splits.mean() - 62) < 3  # uniform on [1, 123]


def test_nlu_rate_and_span_lengths_match_configuration():
    mean_span, rate = 3.0, 0.15
    t = transform([DenoiserConfig("NLU", 1.0, "span", "[NLU]", mean_span=mean_span, corruption_rate=rate)])
    sentinels = set(t.sentinels)
    corrupted = consumed = 0
    lengths = []
    for seed in range(300):
        tokens = packed(512, seed)
        ex = t(tokens, seed)
        spans = split_targets(ex, sentinels)
        n_spans = len(spans)
        span_tokens = sum(len(s) for s in spans)
        # prefix = mode + kept text + one sentinel per span
        kept = ex.prefix_length - 4 - n_spans
        corrupted += span_tokens
        consumed += kept + span_tokens
        lengths += [len(s) for s in spans]
        # reconstruct the source text: prefix with sentinels replaced by their spans
        rebuilt, k = [], 0
        for tok in ex.input_ids[4: ex.prefix_length]:
            if int(tok) in sentinels:
                rebuilt += spans[k]
                k += 1
            else:
                rebuilt.append(int(tok))
        assert rebuilt == tokens[: len(rebuilt)].tolist()
    lengths = np.array(lengths)
    assert lengths.min() >= 1 and lengths.max() <= 5
    assert abs(lengths.mean() - mean_span) < 0.15
    assert abs(corrupted / consumed - rate) < 0.015


def test_nlg_single_span_of_1_to_32_tokens():
    t = transform([DenoiserConfig("NLG", 1.0, "span", "[NLG]", mean_span=16.5, num_spans=1)])
    sentinels = set(t.sentinels)
    lengths = []
    for seed in range(2000):
        ex = t(packed(256, seed), seed)
        spans = split_targets(ex, sentinels)
        assert len(spans) == 1
        lengths.append(len(spans[0]))
        assert (ex.input_ids[ex.prefix_length + 1 + len(spans[0]):] == EOS).all()  # tail padding
    lengths = np.array(lengths)
    assert lengths.min() == 1 and lengths.max() == 32
    assert abs(lengths.mean() - 16.5) < 0.6


def test_x_denoiser_high_rate_and_sentinel_reuse_past_80_spans():
    t = transform([DenoiserConfig("X", 1.0, "span", "", mean_span=3.0, corruption_rate=0.5)])
    sentinels = set(t.sentinels)
    corrupted = consumed = 0
    for seed in range(50):
        ex = t(packed(2048, seed), seed)
        spans = split_targets(ex, sentinels)
        corrupted += sum(map(len, spans))
        consumed += ex.prefix_length - len(spans) + sum(map(len, spans))
        assert len(spans) > 80  # more spans than distinct sentinels: ids are reused in order
    assert abs(corrupted / consumed - 0.5) < 0.02


def test_sentinels_are_below_eos_as_together_did():
    t = transform()
    assert t.sentinels[0] == EOS - 100 and t.sentinels[-1] == EOS - 21 and len(t.sentinels) == 80


def test_modes_tokenize_as_plain_text(tokenizer):
    t = UL2Transform.from_tokenizer(UL2Config(), tokenizer)
    assert tokenizer.decode(t.mode_ids["S2S"]) == "[S2S]"
    assert len(t.mode_ids["NLU"]) > 1  # not special tokens: BPE pieces, as OpenChatKit did


def test_loss_counts_targets_only_and_is_independent_of_micro_batching():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, 50)
    labels = torch.randint(0, 50, (4, 10))
    labels[:, :5] = IGNORE
    per_seq = sequence_losses(logits, labels)
    # changing logits that predict non-target positions changes nothing
    logits2 = logits.clone()
    logits2[:, :3] += 100.0  # positions 0..2 predict tokens 1..3, all IGNORE
    assert torch.allclose(sequence_losses(logits2, labels), per_seq)
    whole = batch_loss(logits, labels, global_batch=4)
    parts = batch_loss(logits[:1], labels[:1], 4) + batch_loss(logits[1:], labels[1:], 4)
    assert torch.allclose(whole, parts) and torch.allclose(whole, per_seq.mean())
    empty = torch.full((1, 10), IGNORE)
    assert float(sequence_losses(logits[:1], empty)) == 0.0


def test_too_short_sequence_is_refused():
    with pytest.raises(ValueError, match="too short"):
        transform()(packed(5, 0), 0)
