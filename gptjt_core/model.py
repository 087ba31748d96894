"""Pipeline stages over GPT-J blocks: a contiguous layer slice, optionally with embedding and head."""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPTJConfig
from transformers.models.gptj.modeling_gptj import GPTJBlock, GPTJRotaryEmbedding

from .checkpoint import CheckpointReader
from .config import ConfigError, flavour_config
from .stage_spec import StageSpec
from .ul2 import prefix_lm_mask


class GPTJStage(nn.Module):
    """GPT-J layers [spec.start, spec.end) with Hugging Face parameter names.

    `state_dict()` keys are exactly GPTJForCausalLM's (global layer indices), so stage
    state dicts merge back into a checkpoint with no renaming.
    """

    def __init__(self, config: GPTJConfig, spec: StageSpec):
        super().__init__()
        spec.check_fits(config.n_layer)
        self.config = config
        self.spec = spec
        self.transformer = nn.Module()
        if spec.embed:
            self.transformer.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.transformer.drop = nn.Dropout(config.embd_pdrop)
        self.transformer.h = nn.ModuleDict({str(i): GPTJBlock(config, layer_idx=i)
                                            for i in range(spec.start, spec.end)})
        if spec.head:
            self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.rotary = GPTJRotaryEmbedding(config)  # sin/cos table; a non-persistent buffer
        # Activation checkpointing (pipeline.activation_checkpointing): blocks per segment whose
        # forward keeps only its input and runs again in the backward; 0 keeps everything.
        self.checkpoint_segment = 0

    def forward(self, x: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids (B, T) if spec.embed else hidden states (B, T, D).

        prefix_lengths: (B,) tokens of bidirectional prefix per sequence; 0 = plain causal.
        Returns logits (B, T, V) if spec.head else hidden states (B, T, D).
        """
        h = self._embed(x) if self.spec.embed else self._check_hidden(x)
        B, T, _ = h.shape
        if prefix_lengths is None:
            prefix_lengths = torch.zeros(B, dtype=torch.long, device=h.device)
        mask = self._attention_bias(prefix_lengths.to(h.device), T, h)  # (B, 1, T, T)
        position_ids = torch.arange(T, device=h.device).unsqueeze(0)  # (1, T)
        sin_cos = self.rotary(h, position_ids=position_ids)
        blocks = list(self.transformer.h.values())
        k = self.checkpoint_segment if torch.is_grad_enabled() else 0
        if not k:
            h = _run_blocks(blocks, h, mask, position_ids, sin_cos)
        else:
            for i in range(0, len(blocks), k):
                # non-reentrant: the recomputation sees the autocast state and RNG of the forward
                h = checkpoint(_run_blocks, blocks[i:i + k], h, mask, position_ids, sin_cos, use_reentrant=False)
        if self.spec.head:
            h = self.lm_head(self.transformer.ln_f(h))  # (B, T, V)
        return h

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"stage {self.spec} embeds token ids: expected an integer tensor "
                             f"(B, T), got {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.config.vocab_size else int(ids.min())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size}); "
                             "was the data tokenized with a different tokenizer?")
        return self.transformer.drop(self.transformer.wte(ids))  # (B, T, D)

    def _check_hidden(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.config.n_embd or not h.is_floating_point():
            raise ValueError(f"stage {self.spec} expects hidden states (B, T, {self.config.n_embd}) "
                             f"floating point, got {tuple(h.shape)} {h.dtype}")
        return h

    @staticmethod
    def _attention_bias(prefix_lengths: torch.Tensor, seq_len: int, h: torch.Tensor) -> torch.Tensor:
        """Additive float mask (B, 1, T, T): 0 where attention is allowed, dtype-min elsewhere.

        Float, not bool: the eager kernel adds the mask to the scores, so a bool mask would be
        silently wrong there. Built in the dtype attention will compute in (autocast-aware).
        """
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        allowed = prefix_lm_mask(prefix_lengths, seq_len)  # (B, T, T) bool
        bias = torch.zeros(allowed.shape, dtype=dtype, device=h.device)
        bias.masked_fill_(~allowed, torch.finfo(dtype).min)
        return bias.unsqueeze(1)


def _run_blocks(blocks: list[nn.Module], h: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                sin_cos: torch.Tensor) -> torch.Tensor:
    """h (B, T, D) through `blocks` in order (one checkpointed segment, or the whole stage)."""
    for block in blocks:
        h = block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=sin_cos)
    return h


def gptj_config(kwargs: dict, attn_implementation: str = "sdpa") -> GPTJConfig:
    """A GPTJConfig from kwargs (a flavour or a checkpoint's config.json)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("architectures", "transformers_version")}
    if kwargs.get("model_type", "gptj") != "gptj":
        raise ConfigError(f"model_type {kwargs['model_type']!r} is not GPT-J; gptjt trains GPTJForCausalLM")
    config = GPTJConfig(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def random_init_tensor(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """GPT-J's init (normal(0, std) weights, zero biases, unit LayerNorm), seeded per tensor name,
    so that a layer gets the same values whichever stage holds it and on any machine."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if ".ln_" in name:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return torch.randn(shape, generator=g) * std


def parse_random_source(source: str) -> tuple[str, int] | None:
    """'random:tiny:0' -> ('tiny', 0); None for any other source."""
    if not source.startswith("random:"):
        return None
    parts = source.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ConfigError(f"model source {source!r} is malformed; write random:FLAVOUR:SEED, e.g. random:tiny:0")
    return parts[1], int(parts[2])


def model_config_for(source: str, attn_implementation: str = "sdpa") -> GPTJConfig:
    """The GPTJConfig of a source without loading any weights."""
    random_source = parse_random_source(source)
    if random_source is not None:
        return gptj_config(flavour_config(random_source[0]), attn_implementation)
    return gptj_config(CheckpointReader(source).config, attn_implementation)


def load_stage(source: str, spec: StageSpec, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", attn_implementation: str = "sdpa",
               reader: CheckpointReader | None = None) -> GPTJStage:
    """Build the stage `spec` of model `source` and load ONLY its own tensors.

    source: local checkpoint directory, hub id (`org/name[@revision]`), or
    `random:FLAVOUR:SEED`. Pass `reader` to reuse an open checkpoint (and inspect
    `reader.tensors_read`).
    """
    random_source = parse_random_source(source)
    if random_source is not None:
        flavour, seed = random_source
        config = gptj_config(flavour_config(flavour), attn_implementation)
        state = {name: random_init_tensor(name, shape, seed, config.initializer_range).to(dtype)
                 for name, shape in stage_shapes(config, spec).items()}
    else:
        reader = reader or CheckpointReader(source)
        config = gptj_config(reader.config, attn_implementation)
        state = reader.read(spec.tensor_names(config.n_layer), dtype=dtype)
    return build_stage(config, spec, state, device, origin=source)


def stage_shapes(config: GPTJConfig, spec: StageSpec) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of stage `spec` (computed on the meta device)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in GPTJStage(config, spec).state_dict().items()}


def build_stage(config: GPTJConfig, spec: StageSpec, state: dict[str, torch.Tensor],
                device: torch.device | str = "cpu", origin: str = "the given state") -> GPTJStage:
    """A stage whose parameters ARE the given tensors (checked for names and shapes)."""
    with torch.device("meta"):  # no memory for the skeleton; the tensors are assigned below
        stage = GPTJStage(config, spec)
    expected = stage.state_dict()
    if set(state) != set(expected):
        raise RuntimeError(f"stage {spec} from {origin}: missing tensors {sorted(set(expected) - set(state))[:3]}, "
                           f"unexpected {sorted(set(state) - set(expected))[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise RuntimeError(f"tensor {name} in {origin} has shape {tuple(tensor.shape)}, "
                               f"the config says {tuple(expected[name].shape)}; config and weights disagree")
    stage.load_state_dict(state, assign=True, strict=True)
    # The rotary table is a non-persistent buffer: rebuild it on a real device.
    stage.rotary = GPTJRotaryEmbedding(config)
    return stage.to(device)


def count_parameters(config: GPTJConfig) -> int:
    """Parameters of the whole model, computed on the meta device (no memory)."""
    with torch.device("meta"):
        stage = GPTJStage(config, StageSpec(0, config.n_layer, embed=True, head=True))
    return sum(p.numel() for p in stage.parameters())
