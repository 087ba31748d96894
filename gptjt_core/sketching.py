"""Computing a Sketch (gptjt_core/commitment.py) of a tensor: the keyed count sketch and the dense projection, in torch."""

from __future__ import annotations

import hashlib
import math
import struct
from functools import lru_cache

import torch

from .commitment import BUCKETS, CACHED_NUMEL, CHUNK, DEFAULT_K, DEFAULT_KEY, MAX_NUMEL, Sketch, check_key

_MASK31 = 0x7FFFFFFF
_MULT = 0x45D9F3B  # a well-mixing odd multiplier (< 2**27: products of 31-bit values stay < 2**58)


def _salts(key: bytes) -> list[int]:
    digest = hashlib.sha256(b"gptjt-sketch-v1/salts/" + key).digest()
    return [int.from_bytes(digest[4 * i:4 * i + 4], "little") & _MASK31 for i in range(4)]


def _signed_buckets(start: int, stop: int, salts: list[int], device: torch.device) -> torch.Tensor:
    """For flat indices [start, stop): a bucket in [0, BUCKETS) and a sign, as one index in
    [0, 2 * BUCKETS) (the upper half counts negatively). Three xorshift-multiply rounds of a
    keyed integer hash; integer ops only, so every device computes the same buckets."""
    h = torch.arange(start, stop, dtype=torch.int64, device=device)
    h ^= salts[0]
    for salt in salts[1:]:
        h ^= h >> 16
        h *= _MULT
        h &= _MASK31
        h ^= salt
    h ^= h >> 16
    return h & (2 * BUCKETS - 1)


@lru_cache(maxsize=2)  # a stage sketches one shape (its output and its gradient are both (B, T, D))
def _cached_index(key: bytes, n: int, device: torch.device) -> torch.Tensor:
    """_signed_buckets of [0, n) as int16: hashing is 90 % of a sketch's time, and a stage
    sketches tensors of one size under one key again and again."""
    salts = _salts(key)
    return torch.cat([_signed_buckets(start, min(n, start + CHUNK), salts, device).to(torch.int16)
                      for start in range(0, n, CHUNK)]) if n else torch.zeros(0, dtype=torch.int16, device=device)


def _index(key: bytes, n: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    if n <= CACHED_NUMEL:
        return _cached_index(key, n, device)[start:stop]
    return _signed_buckets(start, stop, _salts(key), device)


@lru_cache(maxsize=8)
def _dense_cpu(key: bytes, k: int) -> torch.Tensor:
    """(k, BUCKETS) matrix of +-1/sqrt(k) from SHAKE-256 of the key: the same bits everywhere."""
    raw = hashlib.shake_256(b"gptjt-sketch-v1/dense/" + key + k.to_bytes(2, "little")).digest(k * BUCKETS // 8)
    bytes_ = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    bits = (bytes_.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1  # (k * BUCKETS / 8, 8), in uint8
    scale = 1 / math.sqrt(k)
    return bits.reshape(k, BUCKETS).to(torch.float32).mul_(2 * scale).sub_(scale)


def sketch_tensor(tensor: torch.Tensor, key: bytes = DEFAULT_KEY, k: int = DEFAULT_K) -> Sketch:
    """A Sketch of `tensor` (any shape, any float dtype, any device) under `key`, k values."""
    check_key(key, k)
    if not tensor.is_floating_point():
        raise ValueError(f"a sketch is of a float tensor, got {tensor.dtype}")
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n > MAX_NUMEL:
        raise ValueError(f"tensor has {n} values; a sketch takes at most {MAX_NUMEL}: sketch parts")
    bins = torch.zeros(2 * BUCKETS, dtype=torch.float32, device=flat.device)
    sum_sq = 0.0
    for start in range(0, n, CHUNK):
        part = flat[start:start + CHUNK].float()
        index = _index(key, n, start, start + part.numel(), flat.device)
        bins += torch.bincount(index, weights=part, minlength=2 * BUCKETS)  # 3x index_add_'s speed on CPU
        sum_sq += float(torch.dot(part, part))
    signed = bins[:BUCKETS] - bins[BUCKETS:]
    values = _dense_cpu(key, k).to(flat.device) @ signed  # (k,)
    norm = struct.unpack("<f", struct.pack("<f", math.sqrt(sum_sq)))[0] if math.isfinite(sum_sq) else math.inf
    if not math.isfinite(norm) or not bool(torch.isfinite(values).all()):
        raise ValueError(f"tensor {tuple(tensor.shape)} has non-finite values (or overflows fp32 "
                         "sums): a diverged or faulty computation cannot be fingerprinted")
    return Sketch(key, n, norm, tuple(values.cpu().tolist()))
