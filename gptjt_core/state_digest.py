"""The digest of a stage's state that each replica reports after every update (APPLIED), and that
whoever copies the state (`gptjt export --coordinator`) recomputes from the bytes it was sent.

Equal digests mean equal tensors up to the sampled values: up to 2^20 values of each tensor,
evenly strided, so that hashing stays cheap for GPT-J 6B's stages. Tensors go in by name, sorted,
so the digest of a live model's state_dict() and of the same state read back from a safetensors
blob (whose order is its own) agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

SAMPLES_PER_TENSOR = 1 << 20


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex blake2b-128 of the tensors' names and sampled values (as float32, on the CPU)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        h.update(name.encode())
        h.update(flat[::stride].float().cpu().numpy().tobytes())
    return h.hexdigest()
