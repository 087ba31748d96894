"""Read and write Hugging Face GPT-J checkpoints tensor by tensor (never the whole model)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name[@revision]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, malformed or lacks tensors a stage needs."""


class CheckpointReader:
    """Reads named tensors from a local directory or hub repository holding a HF checkpoint.

    Supports safetensors and PyTorch .bin, single-file or sharded with an index. Only the
    files that hold requested tensors are opened (downloaded, for a hub id), and only the
    requested tensors are materialised: safetensors reads them one by one; .bin files are
    memory-mapped. `tensors_read` records every tensor name that was materialised.
    """

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        self.tensors_read: list[str] = []
        local = Path(self.source).expanduser()
        if local.is_dir():
            self._dir: Path | None = local
            self._repo = self._revision = None
        elif local.exists() or not _HUB_ID.match(self.source):
            raise CheckpointError(f"checkpoint {self.source!r} is not a directory; pass a directory "
                                  "holding config.json and model weights, or a hub id like "
                                  "'EleutherAI/gpt-j-6b'")
        else:
            self._dir = None
            self._repo, _, rev = self.source.partition("@")
            self._revision = rev or None
        self.config: dict = json.loads(self._file("config.json").read_text())
        self._weight_map = self._index()
        self._prefix = self._detect_prefix()
        self._bin_cache: dict[str, Mapping[str, torch.Tensor]] = {}

    # -- files -------------------------------------------------------------------------
    def _file(self, name: str, required: bool = True) -> Path | None:
        if self._dir is not None:
            path = self._dir / name
            if path.is_file():
                return path
            if required:
                raise CheckpointError(f"{path} is missing; a GPT-J checkpoint directory needs "
                                      "config.json and model.safetensors or pytorch_model.bin "
                                      "(or their .index.json with shards)")
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(self._repo, name, revision=self._revision))
        except EntryNotFoundError:
            if required:
                raise CheckpointError(f"hub repo {self.source!r} has no file {name!r}") from None
            return None
        except Exception as e:  # offline, unknown repo, auth
            if not required:
                return None
            raise CheckpointError(f"{self.source!r} is not a local directory, and fetching {name!r} "
                                  f"from the hub repo of that name failed: {e}") from e

    def _index(self) -> dict[str, str]:
        """Map tensor name -> file name, from an index or from the single weights file."""
        for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
            index = self._file(index_name, required=False)
            if index is not None:
                try:
                    return dict(json.loads(index.read_text())["weight_map"])
                except (KeyError, json.JSONDecodeError) as e:
                    raise CheckpointError(f"{index} is not a valid weight index: {e}") from e
        single = self._file(SAFETENSORS, required=False)
        if single is not None:
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                return {k: SAFETENSORS for k in f.keys()}
        single = self._file(TORCH_BIN, required=False)
        if single is not None:
            return {k: TORCH_BIN for k in self._load_bin(TORCH_BIN).keys()}
        raise CheckpointError(f"{self.source!r} holds no model.safetensors, pytorch_model.bin or "
                              "index; export a checkpoint with save_pretrained or `gptjt export`")

    def _detect_prefix(self) -> str:
        """GPTJForCausalLM saves 'transformer.h.0...'; a bare GPTJModel saves 'h.0...'."""
        if any(k.startswith("transformer.") for k in self._weight_map):
            return ""
        return "transformer."

    def _load_bin(self, file_name: str) -> Mapping[str, torch.Tensor]:
        if file_name not in self._bin_cache:
            path = self._file(file_name)
            try:
                # mmap: tensors stay on disk until touched; other layers are never read.
                self._bin_cache[file_name] = torch.load(path, map_location="cpu", mmap=True,
                                                        weights_only=True)
            except RuntimeError as e:
                raise CheckpointError(f"{path} cannot be memory-mapped ({e}); re-save it with "
                                      "torch>=1.6 zip serialization or convert it to safetensors") from e
        return self._bin_cache[file_name]

    # -- tensors -----------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor name, in GPTJForCausalLM naming ('transformer.h.0.ln_1.weight', ...)."""
        return [self._prefix + k if not k.startswith("lm_head") else k for k in self._weight_map]

    def _stored_name(self, name: str) -> str:
        if self._prefix and name.startswith(self._prefix):
            return name[len(self._prefix):]
        return name

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Materialise exactly `names` (GPTJForCausalLM naming), grouped by file."""
        names = list(names)
        by_file: dict[str, list[str]] = {}
        missing = []
        for name in names:
            stored = self._stored_name(name)
            if stored not in self._weight_map:
                missing.append(name)
            else:
                by_file.setdefault(self._weight_map[stored], []).append(name)
        if missing:
            raise CheckpointError(f"checkpoint {self.source!r} lacks {len(missing)} tensor(s) the "
                                  f"stage needs, e.g. {missing[:3]}; is it a GPT-J checkpoint with "
                                  "the layer count in its config.json?")
        out: dict[str, torch.Tensor] = {}
        for file_name, file_names in by_file.items():
            if file_name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(self._file(file_name)), framework="pt", device="cpu") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(self._stored_name(name))
                        self.tensors_read.append(name)
            else:
                state = self._load_bin(file_name)
                for name in file_names:
                    out[name] = state[self._stored_name(name)]
                    self.tensors_read.append(name)
        for name, t in out.items():
            out[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        return out


def write_checkpoint(state: Mapping[str, torch.Tensor], config: dict, out_dir: str | os.PathLike,
                     max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `state` as safetensors (sharded with an index above `max_shard_bytes`) + config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    for stale in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX):
        (out / stale).unlink(missing_ok=True)
    for old in out.glob("model-*-of-*.safetensors"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFETENSORS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file_name), metadata={"format": "pt"})
            weight_map.update({k: file_name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out
