"""Write this stage's checkpoint into a shared store (an fsspec URL) without the coordinator.

At GPT-J 6B a step's checkpoint is ~73 GB; streamed through the coordinator, every byte of it
would cross the coordinator's link. When `coordinator.checkpoint_store` is a URL both sides can
reach (s3://, gs://, file:///mnt/shared), the stage's writer puts its file there itself, at
the path the layout names (gptjt_core/store_layout.py), and sends the coordinator only the
header: path, size and SHA-256. The coordinator checks the file's size and safetensors header
and records it; whoever reads the file checks the digest. Credentials come from the worker's
environment, as fsspec's backends read them (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, ...).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from gptjt_core.stage_spec import StageSpec
from gptjt_core.store_layout import stage_file


def write_stage_file(root: str, step: int, spec: StageSpec, blob: bytes, chunk_bytes: int,
                     progress: Callable[[int], None] | None = None) -> tuple[str, str]:
    """Write `blob` as `spec`'s file of `step` under the store `root` (a URL): to a '.partial'
    name first, renamed once whole, so a reader never sees half a file. Returns (its URL, hex
    SHA-256). progress(bytes_written) after each chunk (fault drills)."""
    import fsspec

    final = stage_file(root, step, spec)
    fs, path = fsspec.core.url_to_fs(final)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    digest = hashlib.sha256()
    with fs.open(path + ".partial", "wb") as f:
        for i in range(0, len(blob), chunk_bytes):
            chunk = blob[i:i + chunk_bytes]
            digest.update(chunk)
            f.write(chunk)
            if progress is not None:
                progress(i + len(chunk))
    fs.mv(path + ".partial", path)
    return final, digest.hexdigest()
