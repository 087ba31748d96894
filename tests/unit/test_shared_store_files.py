"""Stage files a worker writes into a shared store itself (worker/store_writer.py) and what the
coordinator's store checks of them (coordinator/checkpoint_store.py adopt/get,
gptjt_core/store_layout.py). The swarm drill is tests/integration/test_shared_store.py."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from gptjt_core.store_layout import header_problem, is_shared_store


def test_a_file_changed_after_it_was_recorded_is_refused_when_read(tmp_path):
    """The coordinator checks a worker-written file's digest as it reads it (GetCheckpoint)."""
    from coordinator.checkpoint_store import CheckpointStore
    from gptjt_core.stage_spec import StageSpec
    from safetensors.torch import save
    import torch
    from worker.store_writer import write_stage_file

    store = CheckpointStore(f"file://{tmp_path}/shared")
    spec = StageSpec(0, 1, embed=True, head=True)
    blob = save({"transformer.wte.weight": torch.ones(4, 2)})
    url, sha256 = write_stage_file(store.root, 7, spec, blob, chunk_bytes=16)
    path = store.adopt(7, spec, url, len(blob))
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha256
    Path(path).write_bytes(save({"transformer.wte.weight": torch.zeros(4, 2)}))  # same size, other values
    with pytest.raises(ValueError, match="not the .* its writer declared"):
        store.get(7, spec, 1, {path: sha256})
    with pytest.raises(ValueError, match="belongs at"):
        store.adopt(7, spec, url.replace("step-00000007", "step-00000008"), len(blob))
    with pytest.raises(ValueError, match="is 120 bytes, not the 5 announced"):
        store.adopt(7, spec, url, 5)



def test_only_urls_are_shared_stores():
    assert is_shared_store("s3://bucket/run") and is_shared_store("file:///mnt/shared/run")
    assert not is_shared_store("/var/lib/gptjt/checkpoints") and not is_shared_store("checkpoints")


def test_a_header_that_does_not_fit_its_file_is_named():
    from safetensors.torch import save
    import torch

    blob = save({"a": torch.ones(3)})
    (n,) = struct.unpack("<Q", blob[:8])
    assert header_problem(blob[:8], len(blob)) == (n, "")
    assert header_problem(blob[:8 + n], len(blob)) == (0, "")
    assert "tensors end at byte" in header_problem(blob[:8 + n], len(blob) + 4)[1]  # bytes appended
    assert "claims" in header_problem(struct.pack("<Q", 1 << 40), len(blob))[1]
    assert "not a safetensors header" in header_problem(struct.pack("<Q", 4) + b"oops", 100)[1]
