"""The bytes each wire codec takes, without torch (gptjt_core/compression.py holds the formats).

The scheduler's cost model charges a link by these sizes, and it runs in the coordinator's
status process too, which must start without importing torch (seconds on every restart).
"""

from __future__ import annotations

CAST_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # lossless casts: bytes a value
QUANT_BITS = {"q8": 8, "q4": 4, "q3": 3}  # blockwise quantizers: bits a code
BLOCK = 128  # values per absmax block: small enough that one outlier spoils few values
SCALE_BYTES = 2  # one bfloat16 scale per block: the top half of the float32 rounded up
CODECS = frozenset(CAST_BYTES) | frozenset(QUANT_BITS)


def codec_nbytes(numel: int, codec: str) -> int:
    """Bytes `codec` encodes `numel` values into; ValueError for a codec not in CODECS."""
    if codec in QUANT_BITS:
        blocks = -(-numel // BLOCK)
        return blocks * BLOCK * QUANT_BITS[codec] // 8 + blocks * SCALE_BYTES
    if codec in CAST_BYTES:
        return numel * CAST_BYTES[codec]
    raise ValueError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")


def bytes_per_value(codec: str) -> float:
    """Wire bytes per value of `codec` for tensors of whole blocks (what the cost model charges)."""
    return codec_nbytes(BLOCK, codec) / BLOCK
