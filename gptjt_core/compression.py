"""Tensor codecs for what crosses the wire: tensor -> (bytes, metadata) and back. No protobuf here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class CodecError(ValueError):
    """Bytes that do not decode: unknown codec, truncated or padded payload, bad shape."""


@dataclass(frozen=True)
class Encoded:
    """An encoded tensor: the payload and what is needed to decode it."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str  # dtype of the decoded tensor, e.g. "float32"
    codec: str


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Lossless-cast codecs: name -> wire dtype. fp16/bf16 halve activation bytes.
_CAST = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CODECS = frozenset(_CAST)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(tensor: torch.Tensor, codec: str) -> Encoded:
    """Encode a floating tensor with `codec` ('fp32', 'fp16', 'bf16')."""
    if codec not in _CAST:
        raise CodecError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
    if not tensor.is_floating_point():
        raise CodecError(f"codec {codec} encodes floating tensors, got {tensor.dtype}")
    wire = tensor.detach().to(device="cpu", dtype=_CAST[codec]).contiguous()
    # bf16 has no numpy dtype: move its bits as int16.
    raw = wire.view(torch.int16) if wire.dtype == torch.bfloat16 else wire
    return Encoded(raw.numpy().tobytes(), tuple(tensor.shape), dtype_name(tensor.dtype), codec)


def decode(enc: Encoded) -> torch.Tensor:
    """Decode to a tensor of enc.shape and enc.dtype, or raise CodecError naming what is wrong."""
    if enc.codec not in _CAST:
        raise CodecError(f"unknown codec {enc.codec!r}; known: {sorted(CODECS)}")
    if enc.dtype not in _DTYPES:
        raise CodecError(f"unknown dtype {enc.dtype!r}; known: {sorted(_DTYPES)}")
    if any(d < 0 for d in enc.shape):
        raise CodecError(f"negative dimension in shape {enc.shape}")
    wire_dtype = _CAST[enc.codec]
    numel = int(np.prod(enc.shape, dtype=np.int64)) if enc.shape else 1
    expected = numel * torch.tensor([], dtype=wire_dtype).element_size()
    if len(enc.data) != expected:
        raise CodecError(f"{enc.codec} payload for shape {enc.shape} must be {expected} bytes, got "
                         f"{len(enc.data)} ({'truncated' if len(enc.data) < expected else 'too long'})")
    np_dtype = np.int16 if wire_dtype == torch.bfloat16 else {torch.float32: np.float32, torch.float16: np.float16}[wire_dtype]
    t = torch.from_numpy(np.frombuffer(enc.data, dtype=np_dtype).copy())
    if wire_dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(enc.shape).to(_DTYPES[enc.dtype])
