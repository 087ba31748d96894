"""Tensor codecs for what crosses the wire: tensor -> (bytes, metadata) and back. No protobuf here.

Codecs:
  fp32, fp16, bf16   casts (fp16/bf16 halve the bytes)
  q8, q4, q3         blockwise absmax quantization: each block of BLOCK = 128 values is scaled
                     by its largest magnitude into signed codes in [-qmax, qmax], qmax = 127
                     (q8, one byte each), 7 (q4, two per byte, low nibble first, stored + 8) or
                     3 (q3, eight per 3 bytes: a little-endian 24-bit word holding code i + 3
                     at bits 3i..3i+2). Payload = the codes of every block, then one bfloat16
                     scale per block (little-endian). bfloat16 keeps float32's exponent range,
                     so tiny gradients keep their scale; its 8 significant bits cost little
                     because the scale is rounded *up* to the next bfloat16 (a code never
                     clips) and the step grows by less than 2**-7. Until 2026-12-06 the scales
                     were float32 and came first: 4 bytes of every q3 block's 52 on a link that
                     is the bottleneck (bench link). So q8 is 1.97x smaller than fp16, q4 3.88x
                     and q3 5.12x (50 bytes per block against 256). The error of one value is
                     at most half a step: |x - x'| <= absmax(block) * (1 + 2**-7) / (2 * qmax),
                     i.e. / (2 * 127) (q8), / (2 * 7) (q4) or / (2 * 3) (q3). A block whose
                     absmax is below qmax * 1.2e-38 (its scale would be subnormal) is sent as zeros.
No residual (error feedback) is carried on the stage links: each activation or activation
gradient is used once, by one micro-batch's computation, so one tensor's rounding error has no
place in the next one's values. Error feedback is where a quantity is compressed again and
again and its running sum counts: the outer step's pseudo-gradient (gptjt_core/outer_sparsity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .codec_sizes import BLOCK, CODECS, QUANT_BITS, SCALE_BYTES, codec_nbytes


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
_QUANT = {"q8": 127, "q4": 7, "q3": 3}
_BITS = {_QUANT[c]: bits for c, bits in QUANT_BITS.items()}  # largest code magnitude -> bits a code
# Blocks per chunk: the passes over one chunk (scale, round, pack) share a 512 KiB scratch
# that stays in cache. Large buffers come from numpy, which asks Linux for transparent huge
# pages: a fresh torch tensor of 32 MiB costs several times more in page faults.
_CHUNK = 1024
_TINY = torch.finfo(torch.float32).tiny
_Q3_WEIGHTS = np.array([8.0**i for i in range(8)], np.float32)  # code i of 8 -> bits 3i..3i+2
_Q3_OFFSET = 3 * sum(8**i for i in range(8))  # codes go on the wire as code + 3, in [0, 6]
# q3 decode: spread a 24-bit word over the 8 bytes of a uint64, halving the field width
# each step (12 -> 6 -> 3 bits): (bits that move, bits that stay, how far they move).
_Q3_SPREAD = ((0xFFF000, 0xFFF, 20),
              (0x00000FC000000FC0, 0x0000003F0000003F, 10),
              (0x0038003800380038, 0x0007000700070007, 5))
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


def encoded_nbytes(numel: int, codec: str) -> int:
    """Bytes `codec` encodes `numel` values into (a receiver checks an announced size with it)."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
    return codec_nbytes(numel, codec)


def _scales_up_to_bfloat16(scale: torch.Tensor) -> torch.Tensor:
    """(n_blocks,) positive finite float32 -> the same values rounded up to the next bfloat16
    (float32 whose low 16 bits are zero): adding 0xFFFF to the bits carries into the upper half
    unless they are already zero. Never rounds to Inf: a scale is amax / qmax <= FLT_MAX / 3."""
    bits = scale.view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def _quantize(tensor: torch.Tensor, qmax: int) -> bytes:
    x = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    numel = x.numel()
    n_blocks = -(-numel // BLOCK)
    if numel % BLOCK:  # pad the last block with zeros
        padded = torch.from_numpy(np.zeros(n_blocks * BLOCK, np.float32))
        padded[:numel] = x
        x = padded
    blocks = x.view(n_blocks, BLOCK)
    amax = torch.maximum(blocks.amax(1), blocks.amin(1).neg_())  # no |x| temporary; NaN propagates
    if not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise CodecError(f"cannot quantize a tensor with {bad} NaN/Inf value(s)")
    # (n_blocks,) float32 on the bfloat16 grid, >= amax / qmax: the codes use at most the range
    scale = _scales_up_to_bfloat16(amax / qmax)
    inv = torch.reciprocal(scale)
    # A block of zeros (or one so small its scale would be subnormal) is sent as zeros: this
    # keeps inv finite, and then |x * inv| <= qmax * (1 + 4e-7), so rounding needs no clamp.
    zero = scale < _TINY
    scale.masked_fill_(zero, 0.0)
    inv.masked_fill_(zero, 0.0)
    bits = _BITS[qmax]
    n_codes = n_blocks * BLOCK * bits // 8  # a multiple of 16: the scales after them stay aligned
    out = np.empty(n_codes + n_blocks * SCALE_BYTES, np.uint8)
    codes = out[:n_codes]
    out[n_codes:].view("<u2")[:] = (scale.view(torch.int32) >> 16).numpy().astype("<u2")
    if bits == 3:
        words = np.empty(n_blocks * BLOCK // 8, np.float32)
    else:  # q8 codes, or q4's lo + 16 * hi in [-119, 119] (+ 136 at the end)
        dest = torch.from_numpy(codes.view(np.int8))
        pairs = torch.from_numpy(np.empty(min(n_blocks, _CHUNK) * BLOCK // 2, np.float32))
    scratch_np = np.empty(min(n_blocks, _CHUNK) * BLOCK, np.float32)
    scratch = torch.from_numpy(scratch_np)
    for start in range(0, n_blocks, _CHUNK):
        stop = min(start + _CHUNK, n_blocks)
        lo, hi = start * BLOCK, stop * BLOCK
        y = torch.mul(blocks[start:stop], inv[start:stop, None], out=scratch[: hi - lo].view(-1, BLOCK)).view(-1)
        y.round_()  # half to even; codes in [-qmax, qmax]
        if bits == 8:
            dest[lo:hi].copy_(y)
        elif bits == 4:
            two = y.view(-1, 2)
            torch.add(two[:, 0], two[:, 1], alpha=16, out=pairs[: (hi - lo) // 2])
            dest[lo // 2: hi // 2].copy_(pairs[: (hi - lo) // 2])
        else:  # sum of c_i * 8**i over 8 codes: integers below 2**24, so exact in float32
            np.dot(scratch_np[: hi - lo].reshape(-1, 8), _Q3_WEIGHTS, out=words[lo // 8: hi // 8])
    if bits == 4:
        np.add(codes, 136, out=codes)  # (lo + 8) | (hi + 8) << 4
    elif bits == 3:
        # 24-bit words (codes + 3, code i at bits 3i..3i+2), four to three little-endian uint32
        w = np.add(words, _Q3_OFFSET, out=words).astype(np.uint32).reshape(-1, 4)
        packed = codes.view("<u4").reshape(-1, 3)
        np.bitwise_or(w[:, 0], w[:, 1] << 24, out=packed[:, 0])
        np.bitwise_or(w[:, 1] >> 8, w[:, 2] << 16, out=packed[:, 1])
        np.bitwise_or(w[:, 2] >> 16, w[:, 3] << 8, out=packed[:, 2])
    return out.tobytes()


def _dequantize(data: bytes, numel: int, qmax: int) -> torch.Tensor:
    n_blocks = -(-numel // BLOCK)
    bits = _BITS[qmax]
    n_codes = n_blocks * BLOCK * bits // 8
    stored = np.frombuffer(data, dtype="<u2", count=n_blocks, offset=n_codes)
    scale_np = (stored.astype(np.uint32) << 16).view(np.float32)  # bfloat16 -> float32, exact
    if not np.isfinite(scale_np).all() or bool((scale_np < 0).any()):
        raise CodecError("quantized payload carries a negative or NaN/Inf block scale; the bytes are corrupt")
    scale = torch.from_numpy(scale_np)
    # The payload is read-only: numpy reads it in place (torch would copy it or warn), and
    # writes small integer codes per chunk into `values`, which torch then scales.
    values = np.empty((n_blocks, BLOCK), np.float32)
    out = torch.from_numpy(values)
    rows = min(n_blocks, _CHUNK)
    if bits == 8:
        src = np.frombuffer(data, np.int8, count=n_codes).reshape(n_blocks, BLOCK)
    elif bits == 4:
        src = np.frombuffer(data, np.uint8, count=n_codes).reshape(n_blocks, BLOCK // 2)
        nibbles, high = np.empty((rows, BLOCK // 2), "<i2"), np.empty((rows, BLOCK // 2), "<i2")
    else:  # one block is 48 bytes: 4 rows of three little-endian uint32 holding four 24-bit words
        src = np.frombuffer(data, "<u4", count=n_codes // 4).reshape(n_blocks, 4, 3)
        words, tmp = np.empty((rows, 4, 4), "<u8"), np.empty((rows, 4, 4), "<u8")
    for start in range(0, n_blocks, _CHUNK):
        stop = min(start + _CHUNK, n_blocks)
        part = src[start:stop]
        if bits == 8:
            codes = part
        elif bits == 4:  # one byte -> one int16 holding (low nibble, high nibble) as its two bytes
            a, b = nibbles[: stop - start], high[: stop - start]
            np.copyto(a, part)
            np.left_shift(a, 4, out=b)
            np.bitwise_and(b, 0x0F00, out=b)
            np.bitwise_and(a, 0x0F, out=a)
            np.bitwise_or(a, b, out=a)
            codes = a.view(np.int8)
            np.subtract(codes, 8, out=codes)
        else:
            w, t = words[: stop - start], tmp[: stop - start]
            np.bitwise_and(part[..., 0], 0xFFFFFF, out=w[..., 0])
            np.bitwise_or(part[..., 0] >> 24, (part[..., 1] & 0xFFFF) << 8, out=w[..., 1])
            np.bitwise_or(part[..., 1] >> 16, (part[..., 2] & 0xFF) << 16, out=w[..., 2])
            np.right_shift(part[..., 2], 8, out=w[..., 3])
            # spread each 24-bit word to 8 bytes, one 3-bit code per byte: 12 -> 6 -> 3 bits
            for move, keep, shift in _Q3_SPREAD:
                np.bitwise_and(w, move, out=t)
                np.left_shift(t, shift, out=t)
                np.bitwise_and(w, keep, out=w)
                np.bitwise_or(w, t, out=w)
            codes = w.view(np.int8)
            np.subtract(codes, 3, out=codes)
        np.copyto(values[start:stop], codes.reshape(stop - start, BLOCK))
        out[start:stop].mul_(scale[start:stop, None])
    return out.reshape(-1)[:numel]


def decode(enc: Encoded) -> torch.Tensor:
    """Decode to a tensor of enc.shape and enc.dtype, or raise CodecError naming what is wrong."""
    if enc.codec not in CODECS:
        raise CodecError(f"unknown codec {enc.codec!r}; known: {sorted(CODECS)}")
    if enc.dtype not in _DTYPES:
        raise CodecError(f"unknown dtype {enc.dtype!r}; known: {sorted(_DTYPES)}")
    if any(d < 0 for d in enc.shape):
        raise CodecError(f"negative dimension in shape {enc.shape}")
    numel = int(np.prod(enc.shape, dtype=np.int64)) if enc.shape else 1
    expected = encoded_nbytes(numel, enc.codec)
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
