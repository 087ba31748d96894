"""The digest of a stage's state that each replica reports after every update (APPLIED), and that
whoever copies the state (a joiner: worker/stage_loader.py; `gptjt export --coordinator`)
recomputes from the bytes it was sent, refusing a state no member reported (`unattested`).

Equal digests mean equal tensors up to the sampled values: up to 2^20 values of each tensor,
evenly strided, so that hashing stays cheap for GPT-J 6B's stages. Tensors go in by name, sorted,
so the digest of a live model's state_dict() and of the same state read back from a safetensors
blob (whose order is its own) agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

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


def served_state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest of a stage state as FetchState sends it (gptjt_core/stage_checkpoint.py layout):
    of the anchor when it holds one (local-steps mode, where that is what replicas report), else of
    its weights."""
    from .stage_checkpoint import outer_state, split_state

    anchor = outer_state(dict(tensors)).get("anchor")
    return state_digest(anchor if anchor else split_state(dict(tensors))[0])


def unattested(tensors: Mapping[str, torch.Tensor], position: int, attested_position: int,
               attested: Collection[str]) -> str:
    """Why a copied stage state (`tensors`, after `position` steps) is not one its stage's members
    reported after the last closed step (`attested`, digests of the state after
    `attested_position` steps), or ''. Nothing to check against (no digests) is no refusal; a state
    at another step cannot be checked and is refused (copy it again once the step closes)."""
    if not attested:
        return ""
    if position != attested_position:
        return (f"it holds the state after {position} steps and the members' digests are of the state after "
                f"{attested_position}; fetch it again once the step has closed")
    digest = served_state_digest(tensors)
    if digest in attested:
        return ""
    return (f"its digest {digest} is none the stage's members reported after {attested_position} steps "
            f"({', '.join(sorted(attested))}): it is not the state they trained")
