"""Where a stage checkpoint lives in the store, and what a safetensors file's header says. Pure.

The layout: ROOT/step-00000010/layers-000-002-embed.safetensors, one file per stage and step.
The coordinator's store (coordinator/checkpoint_store.py) and workers that write a shared
store themselves (worker/store_writer.py) both name files through here, so they agree.
"""

from __future__ import annotations

import json
import struct

from .stage_spec import StageSpec

MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header


def is_shared_store(root: str) -> bool:
    """A store workers can reach themselves: an fsspec URL (s3://, gs://, file:///mnt/shared).
    A plain directory is the coordinator's own disk: workers stream their stage to it."""
    return "://" in root


def step_dir(root: str, step: int) -> str:
    return f"{root.rstrip('/')}/step-{step:08d}"


def stage_file_name(spec: StageSpec) -> str:
    return (f"layers-{spec.start:03d}-{spec.end:03d}" + ("-embed" if spec.embed else "")
            + ("-head" if spec.head else "") + ".safetensors")


def stage_file(root: str, step: int, spec: StageSpec) -> str:
    """The path of `spec`'s file of `step` under `root` (as `root` is written: URL or path)."""
    return f"{step_dir(root, step)}/{stage_file_name(spec)}"


def header_problem(prefix: bytes, nbytes: int) -> tuple[int, str]:
    """Check a safetensors file of `nbytes` bytes from its first bytes: (bytes of the header
    still to read, '') when `prefix` holds only the 8-byte length; then, with the whole header
    in `prefix`, (0, '') if the tensors it lists end exactly at the file's end, else (0, why)."""
    if len(prefix) < 8:
        return 0, f"the file is {nbytes} bytes, too short for a safetensors header"
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > min(MAX_HEADER_BYTES, nbytes - 8):
        return 0, f"its header claims {n} bytes, more than the file's {nbytes} allows"
    if len(prefix) < 8 + n:
        return 8 + n - len(prefix), ""
    try:
        header = json.loads(prefix[8:8 + n])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return 0, f"its header is not a safetensors header ({e})"
    if max(ends, default=0) != nbytes - 8 - n:
        return 0, f"its tensors end at byte {8 + n + max(ends, default=0)}, the file has {nbytes}"
    return 0, ""
