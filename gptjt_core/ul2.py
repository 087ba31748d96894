"""UL2 with a prefix-LM mask: the mask, the R/S/X denoisers on packed sequences, target-only loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import DenoiserConfig, UL2Config

IGNORE = -100  # label of positions that carry no loss (prefix, padding)


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Attention allowed (True) for query i and key j: (B, T, T) bool.

    Within the prefix (i, j < p) attention is bidirectional; every later position attends
    causally (j <= i), which includes the whole prefix. p = 0 gives a plain causal mask.
    """
    if prefix_lengths.dim() != 1:
        raise ValueError(f"prefix_lengths must be (B,), got shape {tuple(prefix_lengths.shape)}")
    if prefix_lengths.numel() and (int(prefix_lengths.min()) < 0 or int(prefix_lengths.max()) > seq_len):
        raise ValueError(f"prefix lengths {prefix_lengths.tolist()} must lie in [0, {seq_len}]")
    pos = torch.arange(seq_len, device=prefix_lengths.device)
    causal = pos[None, :] <= pos[:, None]  # (T, T): key j <= query i
    in_prefix = pos[None, :] < prefix_lengths[:, None]  # (B, T)
    both_in_prefix = in_prefix[:, :, None] & in_prefix[:, None, :]  # (B, T, T)
    return causal[None] | both_in_prefix


@dataclass
class UL2Example:
    """One training sequence after the UL2 transform."""

    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64, IGNORE outside targets (aligned with input_ids, HF style)
    prefix_length: int  # positions [0, prefix_length) attend bidirectionally
    mode: str  # denoiser name


class UL2Transform:
    """Turns a packed token sequence into (input_ids, labels, prefix_length), as GPT-JT did.

    Output length always equals the input length (seq_len), so batches need no padding:
    span modes consume fewer source tokens to make room for sentinels; any leftover tail
    is filled with EOS and carries no loss.
    """

    def __init__(self, config: UL2Config, eos_id: int, mode_prefix_ids: dict[str, Sequence[int]]):
        self.config = config
        self.eos_id = eos_id
        weights = np.array([d.weight for d in config.denoisers], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.mode_ids = {d.name: list(mode_prefix_ids.get(d.name, [])) for d in config.denoisers}
        self.sentinels = [eos_id - config.sentinel_offset + i for i in range(config.num_sentinels)]
        if min(self.sentinels) < 0:
            raise ValueError(f"sentinel ids start below 0 (eos {eos_id} - offset {config.sentinel_offset})")

    @classmethod
    def from_tokenizer(cls, config: UL2Config, tokenizer) -> UL2Transform:
        """Mode prefixes like '[S2S]' are tokenized as plain text (OpenChatKit does the same)."""
        ids = {d.name: tokenizer(d.mode_prefix, add_special_tokens=False)["input_ids"] if d.mode_prefix else []
               for d in config.denoisers}
        return cls(config, tokenizer.eos_token_id, ids)

    def __call__(self, tokens: Sequence[int] | np.ndarray, seed: int | Sequence[int]) -> UL2Example:
        """Transform one packed sequence; the same (tokens, seed) always gives the same result."""
        tokens = np.asarray(tokens, dtype=np.int64)
        rng = np.random.default_rng(seed)
        denoiser = self.config.denoisers[int(rng.choice(len(self.probs), p=self.probs))]
        mode = self.mode_ids[denoiser.name]
        if len(mode) + 2 > len(tokens):
            raise ValueError(f"sequence of {len(tokens)} tokens is too short for mode {denoiser.name!r}")
        if denoiser.kind == "causal":
            return self._causal(tokens, mode, denoiser)
        if denoiser.kind == "prefix":
            return self._prefix(tokens, mode, denoiser, rng)
        return self._spans(tokens, mode, denoiser, rng)

    # -- modes -------------------------------------------------------------------------
    def _causal(self, tokens: np.ndarray, mode: list[int], d: DenoiserConfig) -> UL2Example:
        ids = np.concatenate([mode, tokens])[: len(tokens)].astype(np.int64)
        labels = ids.copy()
        labels[: len(mode)] = IGNORE
        return UL2Example(ids, labels, 0, d.name)

    def _prefix(self, tokens: np.ndarray, mode: list[int], d: DenoiserConfig,
                rng: np.random.Generator) -> UL2Example:
        """S-denoiser: [mode] + text; a uniform split point leaves >= 1 prefix and target token."""
        n = len(tokens) - len(mode)  # source tokens that fit after the mode prefix
        split = int(rng.integers(1, n))  # prefix text tokens, in [1, n-1]
        ids = np.concatenate([mode, tokens[:n]]).astype(np.int64)
        prefix = len(mode) + split
        labels = ids.copy()
        labels[:prefix] = IGNORE
        return UL2Example(ids, labels, prefix, d.name)

    def _spans(self, tokens: np.ndarray, mode: list[int], d: DenoiserConfig,
               rng: np.random.Generator) -> UL2Example:
        """R/X-denoiser: spans of uniform length in [1, 2*mean-1] become sentinels.

        Prefix: [mode] + text with each corrupted span replaced by its sentinel.
        Target: each sentinel followed by the span it hides, in order.
        """
        seq_len = len(tokens)
        max_span = int(round(2 * d.mean_span - 1))
        if d.num_spans:
            spans = self._fixed_spans(seq_len - len(mode) - 2 * d.num_spans, d.num_spans, max_span, rng)
        else:
            spans = self._rate_spans(seq_len - len(mode), d.corruption_rate, max_span, rng)
        left, right = list(mode), []
        pos = 0
        for k, (start, length) in enumerate(spans):
            # Fit: left grows by (start - pos) + 1, right by 1 + length.
            room = seq_len - len(left) - len(right)
            if (start - pos) + 2 + length > room:
                break
            sentinel = self.sentinels[k % len(self.sentinels)]
            left += tokens[pos:start].tolist() + [sentinel]
            right += [sentinel] + tokens[start:start + length].tolist()
            pos = start + length
        room = seq_len - len(left) - len(right)
        left += tokens[pos:pos + room].tolist()  # uncorrupted tail that still fits
        prefix = len(left)
        ids = left + right
        ids += [self.eos_id] * (seq_len - len(ids))
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        labels[prefix:prefix + len(right)] = right
        return UL2Example(np.asarray(ids, dtype=np.int64), labels, prefix, d.name)

    @staticmethod
    def _rate_spans(n: int, rate: float, max_span: int,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
        """Cut [0, n) into chunks of uniform length 1..max_span; corrupt round(rate * chunks) of
        them, chosen without replacement (at least one), never two adjacent (adjacent spans
        would merge into one longer span and skew the span-length distribution)."""
        lengths = rng.integers(1, max_span + 1, size=n)  # more than enough chunks
        ends = np.cumsum(lengths)
        count = int(np.searchsorted(ends, n)) + 1
        starts = np.concatenate([[0], ends[: count - 1]])
        lengths = np.minimum(ends[:count], n) - starts
        k = max(1, int(round(rate * count)))
        # Choose k non-adjacent chunks of `count`: pick k of (count - k + 1) slots, then spread.
        slots = np.sort(rng.choice(count - k + 1, size=min(k, count - k + 1), replace=False))
        chosen = slots + np.arange(len(slots))
        return [(int(starts[c]), int(lengths[c])) for c in chosen]

    @staticmethod
    def _fixed_spans(n: int, num_spans: int, max_span: int,
                     rng: np.random.Generator) -> list[tuple[int, int]]:
        """`num_spans` spans of uniform length 1..max_span at random non-overlapping places."""
        lengths = rng.integers(1, max_span + 1, size=num_spans)
        lengths = np.minimum(lengths, max(1, n // num_spans - 1))
        free = n - int(lengths.sum())  # uncorrupted tokens to distribute around the spans
        gaps = np.sort(rng.integers(0, free + 1, size=num_spans))
        spans, offset = [], 0
        for gap, length in zip(gaps, lengths):
            start = int(gap) + offset
            spans.append((start, int(length)))
            offset += int(length)
        return spans


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each sequence's target tokens: (B,), in fp32.

    logits (B, T, V) at position t predict token t+1; labels (B, T) are aligned with the
    input (IGNORE outside targets). A sequence without targets contributes 0.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    shifted = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted,
                                 ignore_index=IGNORE, reduction="none")  # (B, T-1)
    counts = (shifted != IGNORE).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1)


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, global_batch: int) -> torch.Tensor:
    """This micro-batch's share of the step loss: sum of per-sequence losses / global batch.

    Summed over a step's micro-batches it is the mean per-sequence loss of the global batch,
    whatever the split into micro-batches, stages or replicas: every sequence weighs the same.
    """
    return sequence_losses(logits, labels).sum() / global_batch
