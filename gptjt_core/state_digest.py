"""The digest of a stage's state that each replica reports after every update (APPLIED), and that
whoever copies the state (a joiner: worker/stage_loader.py; `gptjt export --coordinator`)
recomputes from the bytes it was sent, refusing a state no member reported (`unattested`).

SHA-256 over every byte of every tensor (with its name, dtype and shape), tensors sorted by name,
so the digest of a live model's state_dict() and of the same state read back from a safetensors
blob (whose order is its own) agree. Every byte, not a sample: until 2026-12-06 the digest hashed
up to 2^20 evenly strided values of each tensor, which was enough to tell honest replicas apart
but let anyone who read this file change the values between the samples and pass a copy's check.
The cost is one pass over the stage per step: 16 ms for the tiny flavour's stage with the head
(10 ms sampled; timed by hand), and for a GPT-J 6B stage of 3 GB ~1.7 s at the ~1.8 GB/s SHA-256
ran at here (estimated, plus its copy off the GPU; not measured on a GPU host), beside a step of
minutes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

import torch


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of the tensors' names, dtypes, shapes and bytes (a tensor on a GPU is copied to
    the CPU one at a time)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
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
