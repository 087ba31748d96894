"""Tensor codecs for what crosses the wire: tensor -> (bytes, metadata) and back. No protobuf here.

Codecs:
  fp32, fp16, bf16   casts (fp16/bf16 halve the bytes)
  q8, q4             blockwise absmax quantization: each block of BLOCK = 128 values is scaled
                     by its largest magnitude into signed 8-bit ([-127, 127]) or 4-bit ([-7, 7],
                     two per byte) codes. Payload = float32 scale per block (full range: tiny
                     gradients keep their scale), then the codes, so q8 is 1.94x smaller than
                     fp16 and q4 3.76x. The error of one value is at most half a step:
                     |x - x'| <= absmax(block) / (2 * 127) (q8) or / (2 * 7) (q4).
ErrorFeedback keeps what a lossy codec dropped and adds it to the next message of the same
stream (a per-link residual), so that over many messages nothing is lost for good.
"""

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
# Blockwise quantizers: name -> largest code magnitude (codes are symmetric around 0).
_QUANT = {"q8": 127, "q4": 7}
BLOCK = 128  # values per absmax block: small enough that one outlier spoils few values
CODECS = frozenset(_CAST) | frozenset(_QUANT)
LOSSY = frozenset(_QUANT)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(tensor: torch.Tensor, codec: str) -> Encoded:
    """Encode a floating tensor with `codec` (see the module docstring)."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
    if not tensor.is_floating_point():
        raise CodecError(f"codec {codec} encodes floating tensors, got {tensor.dtype}")
    if codec in _QUANT:
        return Encoded(_quantize(tensor, _QUANT[codec]), tuple(tensor.shape), dtype_name(tensor.dtype), codec)
    wire = tensor.detach().to(device="cpu", dtype=_CAST[codec]).contiguous()
    # bf16 has no numpy dtype: move its bits as int16.
    raw = wire.view(torch.int16) if wire.dtype == torch.bfloat16 else wire
    return Encoded(raw.numpy().tobytes(), tuple(tensor.shape), dtype_name(tensor.dtype), codec)


def _quantized_size(numel: int, qmax: int) -> int:
    blocks = -(-numel // BLOCK)
    code_bytes = blocks * BLOCK if qmax > 7 else blocks * BLOCK // 2
    return blocks * 4 + code_bytes


def _quantize(tensor: torch.Tensor, qmax: int) -> bytes:
    x = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    pad = (-x.numel()) % BLOCK
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    blocks = x.view(-1, BLOCK)  # (n_blocks, BLOCK)
    amax = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=1)  # one pass; NaN/Inf show up here
    if not torch.isfinite(amax).all():
        bad = int((~torch.isfinite(x)).sum())
        raise CodecError(f"cannot quantize a tensor with {bad} NaN/Inf value(s)")
    scale = amax / qmax  # (n_blocks,) float32; 0 for a block of zeros
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros(1))
    codes = torch.mul(blocks, inv[:, None]).round_().clamp_(-qmax, qmax).to(torch.int8)
    if qmax <= 7:  # two signed 4-bit codes per byte: low nibble first
        nibbles = codes.add_(8).view(torch.uint8).view(-1, 2)
        codes_bytes = nibbles[:, 0].bitwise_or(nibbles[:, 1] << 4).numpy().tobytes()
    else:
        codes_bytes = codes.numpy().tobytes()
    return scale.numpy().astype("<f4").tobytes() + codes_bytes


def _dequantize(data: bytes, numel: int, qmax: int) -> torch.Tensor:
    blocks = -(-numel // BLOCK)
    scale = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=blocks).copy())
    raw = np.frombuffer(data, dtype=np.uint8 if qmax <= 7 else np.int8, offset=blocks * 4)
    if not torch.isfinite(scale).all() or bool((scale < 0).any()):
        raise CodecError("quantized payload carries a negative or NaN/Inf block scale; the bytes are corrupt")
    if qmax <= 7:
        packed = torch.from_numpy(raw.copy())
        codes = torch.stack([(packed & 0x0F), (packed >> 4)], dim=1).reshape(-1).to(torch.int8) - 8
    else:
        codes = torch.from_numpy(raw.copy())
    values = codes.view(blocks, BLOCK).float() * scale[:, None]
    return values.reshape(-1)[:numel]


class ErrorFeedback:
    """A per-stream residual for a lossy codec: encode(x) sends x + r and keeps
    r' = (x + r) - decode(sent), so the running sum of what was decoded trails the running
    sum of the inputs by one message's error at most. Streams must keep one shape; a new
    shape starts a fresh residual (a different tensor is no continuation)."""

    def __init__(self, codec: str):
        if codec not in CODECS:
            raise CodecError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
        self.codec = codec
        self.residual: torch.Tensor | None = None

    def encode(self, tensor: torch.Tensor) -> Encoded:
        if self.codec not in LOSSY:
            return encode(tensor, self.codec)
        x = tensor.detach().to(device="cpu", dtype=torch.float32)
        if self.residual is not None and self.residual.shape == x.shape:
            x = x + self.residual
        enc = encode(x, self.codec)
        self.residual = x - decode(enc).float()
        return Encoded(enc.data, enc.shape, dtype_name(tensor.dtype), enc.codec)


def decode(enc: Encoded) -> torch.Tensor:
    """Decode to a tensor of enc.shape and enc.dtype, or raise CodecError naming what is wrong."""
    if enc.codec not in CODECS:
        raise CodecError(f"unknown codec {enc.codec!r}; known: {sorted(CODECS)}")
    if enc.dtype not in _DTYPES:
        raise CodecError(f"unknown dtype {enc.dtype!r}; known: {sorted(_DTYPES)}")
    if any(d < 0 for d in enc.shape):
        raise CodecError(f"negative dimension in shape {enc.shape}")
    numel = int(np.prod(enc.shape, dtype=np.int64)) if enc.shape else 1
    if enc.codec in _QUANT:
        expected = _quantized_size(numel, _QUANT[enc.codec])
    else:
        expected = numel * torch.tensor([], dtype=_CAST[enc.codec]).element_size()
    if len(enc.data) != expected:
        raise CodecError(f"{enc.codec} payload for shape {enc.shape} must be {expected} bytes, got "
                         f"{len(enc.data)} ({'truncated' if len(enc.data) < expected else 'too long'})")
    if enc.codec in _QUANT:
        return _dequantize(enc.data, numel, _QUANT[enc.codec]).reshape(enc.shape).to(_DTYPES[enc.dtype])
    wire_dtype = _CAST[enc.codec]
    np_dtype = np.int16 if wire_dtype == torch.bfloat16 else {torch.float32: np.float32, torch.float16: np.float16}[wire_dtype]
    t = torch.from_numpy(np.frombuffer(enc.data, dtype=np_dtype).copy())
    if wire_dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(enc.shape).to(_DTYPES[enc.dtype])
