"""The stage checkpoint store: a directory on the coordinator host or any fsspec URL (s3://, gs://)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable

import torch

from gptjt_core.stage_spec import StageSpec
from gptjt_core.stage_checkpoint import wanted_names
from gptjt_core.store_layout import header_problem, is_shared_store, stage_file, stage_file_name, step_dir

_FILE = re.compile(r"layers-(\d+)-(\d+)(-embed)?(-head)?\.safetensors$")
_STEP = re.compile(r"step-(\d+)$")


class CheckpointStore:
    """Stage checkpoints under `root` (a local directory or an fsspec URL such as s3://bucket/run):
    root/step-00000010/layers-000-002-embed.safetensors, one file per stage and step."""

    def __init__(self, root: str):
        import fsspec

        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.fs.makedirs(self.path, exist_ok=True)

    @staticmethod
    def file_name(spec: StageSpec) -> str:
        return stage_file_name(spec)

    def _step_dir(self, step: int) -> str:
        return step_dir(self.path, step)

    def put(self, step: int, spec: StageSpec, blob: bytes) -> str:
        """Store one stage's safetensors blob for `step` (written then renamed: never half a file)."""
        from safetensors.torch import load

        try:
            load(blob)  # refuse a corrupt upload before it replaces anything
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"checkpoint of stage {spec} at step {step} is not a valid safetensors blob "
                             f"({len(blob)} bytes): {e}") from None
        directory = self._step_dir(step)
        self.fs.makedirs(directory, exist_ok=True)
        final = f"{directory}/{self.file_name(spec)}"
        tmp = final + ".partial"
        with self.fs.open(tmp, "wb") as f:
            f.write(blob)
        self.fs.mv(tmp, final)
        return final

    def adopt(self, step: int, spec: StageSpec, stored_at: str, nbytes: int) -> str:
        """A stage file a worker wrote into this (shared) store itself: check that it is where the
        layout puts it, `nbytes` long, and a safetensors file whose tensors end at its end, reading
        only its header (never the data: the coordinator holds no blob). Its digest is checked
        when it is read (`get`). Returns its path; ValueError says why it is refused."""
        if not is_shared_store(self.root):
            raise ValueError(f"this run's store {self.root} is the coordinator's own directory; stream the stage's "
                             "data to it")
        expected = stage_file(self.root, step, spec)
        if stored_at != expected:
            raise ValueError(f"the stage file of {spec} at step {step} belongs at {expected}, not {stored_at}")
        path = f"{self._step_dir(step)}/{self.file_name(spec)}"
        try:
            size = int(self.fs.info(path)["size"])
        except FileNotFoundError:
            raise ValueError(f"{stored_at} is not in the store; write it before recording it") from None
        if size != nbytes:
            raise ValueError(f"{stored_at} is {size} bytes, not the {nbytes} announced")
        with self.fs.open(path, "rb") as f:
            prefix = f.read(8)
            more, why = header_problem(prefix, size)
            if more:
                prefix += f.read(more)
                _, why = header_problem(prefix, size)
        if why:
            raise ValueError(f"{stored_at} is not a valid safetensors file: {why}")
        return path

    def upload(self, step: int, spec: StageSpec, nbytes: int, sha256: str) -> Upload:
        """Receive one stage's file for `step` chunk by chunk (see Upload)."""
        return Upload(self, step, spec, nbytes, sha256)

    def delete(self, step: int) -> None:
        """Remove every file of `step` (the ledger has forgotten it first)."""
        directory = self._step_dir(step)
        if self.fs.exists(directory):
            self.fs.rm(directory, recursive=True)

    def steps(self) -> list[int]:
        out = []
        for entry in self.fs.ls(self.path, detail=False):
            m = _STEP.search(entry.rstrip("/"))
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def specs(self, step: int) -> list[StageSpec]:
        out = []
        for entry in self.fs.ls(self._step_dir(step), detail=False):
            m = _FILE.search(entry)
            if m:
                out.append(StageSpec(int(m.group(1)), int(m.group(2)), bool(m.group(3)), bool(m.group(4))))
        return sorted(out, key=lambda s: s.start)

    def is_complete(self, step: int, n_layer: int) -> bool:
        """Do the step's files cover every layer, the embedding and the head?"""
        specs = self.specs(step) if step in self.steps() else []
        layers = set()
        for s in specs:
            layers.update(range(s.start, s.end))
        return (layers == set(range(n_layer)) and any(s.embed for s in specs) and any(s.head for s in specs))

    def latest_complete(self, n_layer: int) -> int | None:
        complete = [s for s in self.steps() if self.is_complete(s, n_layer)]
        return complete[-1] if complete else None

    def get(self, step: int, spec: StageSpec, n_layer: int,
            digests: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The weights and optimizer state of `spec` at `step`, gathered from whichever stage
        files hold them (the store re-slices: the saved stage layout does not matter). digests:
        path -> SHA-256 its writer declared (files workers wrote themselves): such a file is
        hashed before it is used, and one that does not match is refused (ValueError)."""
        from safetensors import safe_open
        from safetensors.torch import load

        out: dict[str, torch.Tensor] = {}
        for saved in self.specs(step):
            path = f"{self._step_dir(step)}/{self.file_name(saved)}"
            if digests and path in digests:
                self._check_digest(path, digests[path])
            protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
            if "file" in protocols:  # local: read only the wanted tensors from disk
                with safe_open(path, framework="pt") as f:
                    for name in wanted_names(f.keys(), spec, n_layer):
                        out[name] = f.get_tensor(name)
            else:  # remote (s3://, gs://, memory://): fetch the file, keep the wanted tensors
                tensors = load(self.fs.cat(path))
                for name in wanted_names(tensors, spec, n_layer):
                    out[name] = tensors[name]
        missing = set(spec.tensor_names(n_layer)) - set(out)
        if missing:
            raise FileNotFoundError(f"checkpoint step {step} in {self.root} lacks {len(missing)} tensor(s) of "
                                    f"stage {spec}, e.g. {sorted(missing)[:3]}")
        return out


    def _check_digest(self, path: str, sha256: str, chunk: int = 8 << 20) -> None:
        import hashlib

        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        if h.hexdigest() != sha256.lower():
            raise ValueError(f"{path} hashes to {h.hexdigest()[:16]}..., not the {sha256[:16]}... its writer "
                             "declared: it changed after it was recorded (a faulty or hostile writer, or the store)")


class Upload:
    """One stage file arriving in chunks, never held whole: written to a temporary file while
    hashed, then kept (moved under its final name) only if it is exactly the bytes announced,
    hashes to the declared SHA-256 and is a valid safetensors file. Anything else leaves nothing
    behind: a half-written or mismatched upload never becomes part of the store."""

    def __init__(self, store: CheckpointStore, step: int, spec: StageSpec, nbytes: int, sha256: str):
        import hashlib
        import os
        import tempfile

        self.store, self.step, self.spec, self.nbytes, self.sha256 = store, step, spec, nbytes, sha256.lower()
        protocols = (store.fs.protocol,) if isinstance(store.fs.protocol, str) else store.fs.protocol
        self.local = "file" in protocols
        self.directory = store._step_dir(step)
        store.fs.makedirs(self.directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".upload-", suffix=".partial", dir=self.directory if self.local else None)
        self._file = os.fdopen(fd, "wb")
        self._digest, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.nbytes:
            raise ValueError(f"checkpoint of stage {self.spec} at step {self.step} is larger than the "
                             f"{self.nbytes} bytes announced")
        self._digest.update(chunk)
        self._file.write(chunk)

    async def receive(self, chunks: AsyncIterable[bytes]) -> str:
        """Write `chunks` in order, each off the event loop before the next is asked for, then
        check and keep the file (`finish`); ValueError: refused. Reading one chunk at a time is
        what bounds the memory an upload holds: gRPC reads a message off the connection only when
        asked, so what waits is what HTTP/2 flow control lets the sender have in flight (the
        stream's window, sized by gRPC to the link), not the file. Measured by
        tests/integration/test_upload_memory.py: a 512 MiB upload to a writer slower than loopback
        raised the receiving process's peak memory by tens of MiB."""
        async for chunk in chunks:
            await asyncio.to_thread(self.write, chunk)
        return await asyncio.to_thread(self.finish)

    def finish(self) -> str:
        """Check and keep the file; returns its path in the store (ValueError: refused)."""
        import os

        from safetensors import safe_open

        self._file.close()
        if self.size != self.nbytes or self._digest.hexdigest() != self.sha256:
            raise ValueError(f"checkpoint of stage {self.spec} at step {self.step} is {self.size} bytes hashing to "
                             f"{self._digest.hexdigest()[:16]}..., not the {self.nbytes} bytes and "
                             f"{self.sha256[:16]}... announced (a partial or corrupted upload)")
        try:
            with safe_open(self.tmp, framework="pt") as f:
                list(f.keys())
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"checkpoint of stage {self.spec} at step {self.step} is not a valid safetensors "
                             f"file: {e}") from None
        final = f"{self.directory}/{self.store.file_name(self.spec)}"
        if self.local:
            os.replace(self.tmp, final)
        else:
            self.store.fs.put_file(self.tmp, final + ".partial")
            self.store.fs.mv(final + ".partial", final)
        return final

    def discard(self) -> None:
        import os

        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

