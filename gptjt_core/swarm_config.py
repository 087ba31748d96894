"""Settings of the swarm's data path: pipeline stages, stage-to-stage links, replica averaging."""

from __future__ import annotations

from dataclasses import dataclass

from .config_errors import _check

# Codec names the config accepts; gptjt_core.compression implements them (and a test
# keeps the two lists equal).
CODEC_NAMES = frozenset({"fp32", "fp16", "bf16", "q8", "q4", "q3"})


@dataclass
class PipelineConfig:
    """How the model is cut into stages and what crosses stage boundaries."""

    num_stages: int = 2
    """Pipeline stages, an integer >= 1 and at most the model's layers; the scheduler decides how
    many layers each holds ([scheduler]). With min_stages / max_stages set, this is the plan the
    run starts from, before any worker is measured."""
    min_stages: int = 0
    """Fewest stages the cost-model scheduler may choose, an integer in 1 .. num_stages (0: num_stages).
    Below num_stages with replicas_per_stage > 1 it may choose fewer, larger replica groups, whose
    averaging it prices at the probed link speed until their first round is timed: on the tiny
    flavour it may start with data parallel, and moves to the pipeline at the next complete
    checkpoint once the rounds turn out slow (train.checkpoint_every 0 never checkpoints, so the
    first plan stays; `gptjt bench costmodel`, the swarm allowed 1 stage x 2 replicas)."""
    max_stages: int = 0
    """Most stages the cost-model scheduler may choose, an integer >= num_stages and at most the
    model's layers (0: num_stages). Between the two bounds the scheduler picks the count from the
    workers' measured devices and links (coordinator/placement.py); a new count applies like any
    re-plan: at once before the first step, else at a restore point."""
    max_in_flight: int = 0
    """Micro-batches stage 0 keeps in the pipeline at once, an integer >= 0 (0: max_stages + 1, or
    num_stages + 1 without max_stages)."""
    activation_codec: str = "fp16"
    """Codec for activations sent forward: one of 'fp32', 'fp16', 'bf16', 'q8', 'q4', 'q3'
    (CODEC_NAMES; see gptjt_core.compression.CODECS)."""
    gradient_codec: str = "fp16"
    """Codec for activation gradients sent backward, one of CODEC_NAMES."""
    chunk_bytes: int = 1 << 20
    """Bytes per gRPC message when streaming a tensor, 4 KiB .. 4 MiB (gRPC's default cap is 4 MB)."""
    max_payload_bytes: int = 1 << 30
    """Largest tensor a stage accepts, in bytes, at least chunk_bytes; bigger payloads are
    refused before they are buffered."""
    replicas_per_stage: int = 1
    """Data-parallel replicas the coordinator assigns to each stage, an integer >= 1 (more joiners
    wait on standby). With more than one, replicas sum their gradients through hivemind at every
    step close."""
    start_with_replicas: int = 1
    """The run's first step waits until every stage has this many ready replicas (later steps
    go on with whoever holds the state, down to one per stage); an integer in 1 .. replicas_per_stage."""
    activation_checkpointing: str = "none"
    """What each stage keeps of a micro-batch's forward for its backward: 'none' (everything:
    fastest, most memory), 'block' (each block's input only; its forward runs again in the
    backward: about a third more compute) or 'every-K' (the input of every K-th block; K blocks
    run again at once). coordinator/memory_model.py says what each costs per stage."""
    joiner_grace_s: float = 5.0
    """A step waits up to this many seconds (from the previous step's close) for replicas still
    copying or loading the state, so a joiner catches up instead of always trailing a short step;
    a number >= 0 (0: never wait)."""

    def __post_init__(self) -> None:
        _check(self.num_stages >= 1, "num_stages", self.num_stages, "an integer >= 1")
        _check(0 <= self.min_stages <= self.num_stages, "min_stages", self.min_stages,
               f"an integer in 1 .. num_stages ({self.num_stages}), or 0 for num_stages")
        _check(self.max_stages == 0 or self.max_stages >= self.num_stages, "max_stages", self.max_stages,
               f"an integer >= num_stages ({self.num_stages}), or 0 for num_stages")
        _check(self.max_in_flight >= 0, "max_in_flight", self.max_in_flight, "an integer >= 0")
        for name in ("activation_codec", "gradient_codec"):
            value = getattr(self, name)
            _check(value in CODEC_NAMES, name, value, f"one of {sorted(CODEC_NAMES)}")
        _check(4096 <= self.chunk_bytes <= 4 << 20, "chunk_bytes", self.chunk_bytes,
               "4 KiB .. 4 MiB (gRPC's default message cap)")
        _check(self.max_payload_bytes >= self.chunk_bytes, "max_payload_bytes", self.max_payload_bytes,
               "at least chunk_bytes")
        _check(self.replicas_per_stage >= 1, "replicas_per_stage", self.replicas_per_stage, "an integer >= 1")
        _check(checkpoint_segment(self.activation_checkpointing) >= 0, "activation_checkpointing",
               self.activation_checkpointing, "'none', 'block' or 'every-K' with K an integer >= 1")
        _check(self.joiner_grace_s >= 0, "joiner_grace_s", self.joiner_grace_s, "a number of seconds >= 0")
        _check(1 <= self.start_with_replicas <= self.replicas_per_stage, "start_with_replicas",
               self.start_with_replicas, f"an integer in 1 .. replicas_per_stage ({self.replicas_per_stage})")

    @property
    def stage_counts(self) -> list[int]:
        """The stage counts the scheduler may choose among (just num_stages unless bounded)."""
        return list(range(self.min_stages or self.num_stages, (self.max_stages or self.num_stages) + 1))

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or (self.max_stages or self.num_stages) + 1

    @property
    def checkpoint_segment(self) -> int:
        """Blocks per recomputed segment: 0 no activation checkpointing, 1 every block, K every K."""
        return checkpoint_segment(self.activation_checkpointing)


def checkpoint_segment(setting: str) -> int:
    """pipeline.activation_checkpointing as blocks per segment (0: none); -1 when malformed."""
    if setting == "none":
        return 0
    if setting == "block":
        return 1
    k = setting.removeprefix("every-")
    return int(k) if k != setting and k.isdigit() and int(k) >= 1 else -1


@dataclass
class LinkConfig:
    """Stage-to-stage links: each worker picks the codecs of its downstream links from their
    measured throughput, and (for tests and benchmarks) can emulate a slow link in its transport."""

    adaptive_codecs: bool = False
    """Choose codecs per downstream link: below slow_link_mbit the slow codecs replace
    pipeline.activation_codec / gradient_codec on that link (fewer bits on a slow link). false:
    every link uses the pipeline codecs."""
    slow_link_mbit: float = 1000.0
    """Measured link throughput (Mbit/s, payload bytes over the call time the link took) under
    which a link counts as slow, a number > 0. It must rise 25 % above this to count as fast again."""
    slow_activation_codec: str = "q4"
    """Activation codec on a slow link, one of CODEC_NAMES."""
    slow_gradient_codec: str = "q4"
    """Gradient codec asked for on a slow link (the downstream stage encodes the reply with it),
    one of CODEC_NAMES."""
    emulate_mbit: float = 0.0
    """Emulated bandwidth of every downstream link, each direction, in Mbit/s >= 0 (0: not shaped).
    For tests and benchmarks on loopback; the shaper queues bytes like a real serial link."""
    emulate_latency_ms: float = 0.0
    """Emulated one-way latency added to every message on a shaped link, in milliseconds >= 0."""
    tls: str = "on"
    """Stage links: "on": mutual TLS with certificates the coordinator (the run's CA) issues at
    join; each stage serves only the workers placed before it (and FetchState only joiners it
    names), and every byte between stages is encrypted. "off": plaintext and unauthenticated,
    for a trusted network or a benchmark comparing the two (bench swarm auth_overhead_pct)."""
    cert_days: float = 30.0
    """Lifetime of the stage-link certificates and run-DHT access tokens the coordinator issues,
    in days > 0 (nothing renews them: a worker that outlives it must be restarted to join again)."""

    def __post_init__(self) -> None:
        _check(self.tls in ("on", "off"), "tls", self.tls, "'on' or 'off'")
        _check(self.cert_days > 0, "cert_days", self.cert_days, "a number of days > 0")
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
    retried with the replicas still alive; the coordinator restarts the step after 3 x this. > 0."""
    matchmaking_s: float = 0.5
    """How long replicas wait to assemble a group, in seconds > 0 (hivemind min_matchmaking_time)."""
    poison_norm_factor: float = 10.0
    """A contribution whose gradient norm per micro-batch exceeds this factor times the stage's
    reference (the lower median of the replicas' norms and the previous step's) is refused. > 1."""
    mode: str = "every-step"
    """"every-step": replicas sum their gradients at every step and stay identical.
    "local-steps" (DiLoCo-style): each replica applies its own gradients (its share of the
    batch, scaled to a full batch) for outer_every steps; then the replicas average how far they
    moved from the last common point (the pseudo-gradient) and take one outer step together.
    Averaging traffic per optimizer step falls by outer_every x (times the compression's ratio)."""
    outer_every: int = 32
    """Steps between outer steps in "local-steps" mode (DiLoCo's H), an integer >= 1."""
    outer_density: float = 1.0
    """Share of each pseudo-gradient's coordinates the replicas average at an outer step, in (0, 1]:
    below 1, the same random k = ceil(density x numel) coordinates at every replica, the rest kept
    in each replica's residual and sent at later outer steps (error feedback;
    gptjt_core/outer_sparsity.py). Traffic falls by 1 / density on top of outer_every and the
    compression. "local-steps" mode only."""
    outer_lr: float = 1.0
    """Outer learning rate, > 0: 1 with no momentum is plain averaging of the replicas (DiLoCo: 0.7)."""
    outer_momentum: float = 0.0
    """Nesterov momentum of the outer step, in [0, 1) (DiLoCo: 0.9; 0 disables)."""
    max_restarts: int = 2
    """Times the coordinator restarts a step whose AVERAGING phase overran 3 x timeout_s before the
    stages that could not average fall back to one replica for that step. An integer >= 0 (0:
    fall back at once)."""
    fallback_steps: int = 10
    """Steps the replicas set aside by that fallback stay out of their stage; then they (or others)
    join it again, copying its state and building a fresh averager. An integer >= 1."""
    rebuild_after_failures: int = 3
    """A replica whose rounds fail this many times in a row without forming a group rebuilds its
    averager, bootstrapping from the DHT peers the coordinator names now (a remedy for a peer cut
    off from the others; a round whose group formed and then failed resets the count). An
    integer >= 1."""

    def is_outer_step(self, step: int) -> bool:
        """In "local-steps" mode, step s (s > 0, s a multiple of outer_every) starts with an outer
        step over the inner steps s - outer_every .. s - 1, then takes its own inner step."""
        return self.mode == "local-steps" and step > 0 and step % self.outer_every == 0

    def __post_init__(self) -> None:
        _check(self.mode in ("every-step", "local-steps"), "mode", self.mode, "'every-step' or 'local-steps'")
        _check(self.outer_every >= 1, "outer_every", self.outer_every, "an integer >= 1")
        _check(self.outer_lr > 0, "outer_lr", self.outer_lr, "a number > 0")
        _check(0 < self.outer_density <= 1, "outer_density", self.outer_density, "a number in (0, 1]")
        _check(self.outer_density == 1 or self.mode == "local-steps", "outer_density", self.outer_density,
               '1 unless mode = "local-steps" (every-step mode sums whole gradients)')
        _check(0 <= self.outer_momentum < 1, "outer_momentum", self.outer_momentum, "a number in [0, 1)")
        _check(self.compression in AVERAGING_COMPRESSIONS, "compression", self.compression,
               f"one of {list(AVERAGING_COMPRESSIONS)}")
        _check(self.timeout_s > 0, "timeout_s", self.timeout_s, "a number of seconds > 0")
        _check(self.matchmaking_s > 0, "matchmaking_s", self.matchmaking_s, "a number of seconds > 0")
        _check(self.poison_norm_factor > 1, "poison_norm_factor", self.poison_norm_factor, "a number > 1")
        _check(isinstance(self.max_restarts, int) and self.max_restarts >= 0, "max_restarts", self.max_restarts,
               "an integer >= 0")
        _check(isinstance(self.fallback_steps, int) and self.fallback_steps >= 1, "fallback_steps",
               self.fallback_steps, "an integer >= 1")
        _check(isinstance(self.rebuild_after_failures, int) and self.rebuild_after_failures >= 1,
               "rebuild_after_failures", self.rebuild_after_failures, "an integer >= 1")
