"""Labels on a stage link: (B, T) token ids in 2 bytes each where they fit, else 4.

The labels travel with every micro-batch to the last stage, beside the activations. As int64
(the format until 2026-12-05) a (2, 64) micro-batch's labels were 1,024 bytes beside 6,656 of
q3 activations at the tiny flavour's width of 128: 13 % of each message on a slow link, where
every byte is time (bench link). At GPT-J's width (4,096) the same int64 labels are ~0.5 % of a
q3 message. In 2 bytes a label they are ~4 % of the tiny flavour's q3 message and ~0.1 % of GPT-J's.

Two widths, told apart by length (the receiver knows B and T from the activations' shape):
  2 bytes a label: uint16 little-endian, 0xFFFF for IGNORE; used when every label is below 0xFFFF
                   (GPT-J's vocabulary is 50,400).
  4 bytes a label: int32 little-endian, IGNORE as itself; any larger vocabulary.
What the values mean is checked after decoding (micro_batch_validation.check_labels): a token
id below the run's vocabulary size, or IGNORE.
"""

from __future__ import annotations

import numpy as np
import torch

from gptjt_core.ul2 import IGNORE

NARROW_IGNORE = 0xFFFF  # IGNORE in the 2-byte form (no token id there: the form needs ids < 0xFFFF)
WIDTHS = (2, 4)  # bytes a label, in the order a sender tries them


class LabelWireError(ValueError):
    """Label bytes that are not (B, T) labels in either width."""


def labels_to_wire(labels: torch.Tensor) -> bytes:
    """(B, T) integer labels -> bytes in the narrowest width that holds them all."""
    values = labels.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    targets = values[values != IGNORE]
    if targets.size and (targets.min() < 0 or targets.max() >= 2**31):
        raise LabelWireError(f"labels hold {int(targets.min())}..{int(targets.max())}: a label is a token id "
                             f"in [0, 2**31) or {IGNORE} (ignored)")
    if not targets.size or targets.max() < NARROW_IGNORE:
        return np.where(values == IGNORE, NARROW_IGNORE, values).astype("<u2").tobytes()
    return values.astype("<i4").tobytes()


def wire_lengths(batch: int, seq_len: int) -> tuple[int, ...]:
    """The byte lengths (batch, seq_len) labels may have on the wire, one per width."""
    return tuple(w * batch * seq_len for w in WIDTHS)


def expected_lengths(batch: int, seq_len: int) -> str:
    """What a receiver expects, for an error message: '256 or 512 bytes (2 or 4 bytes each)'."""
    return (f"{' or '.join(str(n) for n in wire_lengths(batch, seq_len))} bytes "
            f"({' or '.join(str(w) for w in WIDTHS)} bytes each)")


def labels_from_wire(data: bytes, batch: int, seq_len: int) -> torch.Tensor:
    """Bytes from a stage link -> (batch, seq_len) int64 labels (IGNORE where no loss).

    Raises LabelWireError when the length is neither width's for that shape; the values are
    not checked against a vocabulary here."""
    n = batch * seq_len
    if n == 0 or len(data) not in wire_lengths(batch, seq_len):
        raise LabelWireError(f"{len(data)} label bytes for (B, T) = {(batch, seq_len)}: expected "
                             f"{expected_lengths(batch, seq_len)}")
    if len(data) == 2 * n:
        narrow = np.frombuffer(data, dtype="<u2").astype(np.int64)
        values = np.where(narrow == NARROW_IGNORE, IGNORE, narrow)
    else:
        values = np.frombuffer(data, dtype="<i4").astype(np.int64)
    return torch.from_numpy(values.reshape(batch, seq_len))
