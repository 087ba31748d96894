"""What one replica of a stage holds in device memory while it trains, by kind, in bytes. Pure.

Per parameter of the stage (its blocks, plus the embedding on stage 0 and ln_f + LM head on
the last): fp32 weights 4, fp32 gradients 4, AdamW moments 8 (8-bit AdamW: 2). Under bf16 or
fp16 autocast, every micro-batch in flight also keeps a 16-bit copy of each matmul weight
(2 bytes a parameter), saved for its backward; with activation checkpointing the blocks'
copies exist once (while a forward or a recomputation runs), not per micro-batch in flight.

Activations, per micro-batch in flight, t = micro_batch x seq_len tokens, d = n_embd:
  - the input the stage received (kept for its backward): 4 t d (fp32), except stage 0 (ids);
  - per block, what autograd saves for the backward (MEASURED, not derived: `saved_bytes` in
    tests/unit/test_memory_model.py counts it with torch's saved-tensor hooks on the real
    GPTJBlock, n_inner = 4 d, sdpa attention): 106 t d bytes in fp32, 62 t d under bf16/fp16
    autocast (layer norms and the residual stream stay fp32; gelu_new's tanh form keeps several
    4d-wide intermediates, which is why this is above Korthikanti et al.'s 34 t d for a
    sequential GPT block). sdpa keeps no T x T score matrix (eager attention would);
  - the head: log-softmax output 4 t V plus ~8 t d (ln_f, LM-head input);
  - the prefix-LM attention mask, micro_batch x seq_len^2 values in the compute dtype;
  - with checkpointing every K blocks: 4 t d per segment (its input), and while one segment is
    recomputed in the backward, that segment's full activations (and, under autocast, its
    weight copies) on top: once, not per micro-batch in flight.
Transient, once per stage: the head's logits and their gradient, 8 t V, while a micro-batch
passes the loss. Allocator fragmentation, the CUDA context and the kernels' workspaces are not
counted (cost_model.MEMORY_HEADROOM leaves room for them).
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes autograd saves per token, per unit of n_embd, per GPT-J block (see the docstring).
BLOCK_ACTIVATION_BYTES = {"fp32": 106, "bf16": 62, "fp16": 62}
BLOCK_INPUT_BYTES = 4  # the residual stream between blocks is fp32 (per token and unit of d)
HEAD_BYTES_PER_VOCAB = 4  # fp32 log-softmax output, per token and vocabulary entry
HEAD_BYTES_PER_D = 8  # ln_f input and the LM head's input, per token and unit of d


@dataclass(frozen=True)
class StageShape:
    """One stage of a GPT-J: its blocks and what else it holds."""

    blocks: int
    d_model: int
    vocab: int
    block_params: int  # parameters of one block (all of them matmul weights but ~10 d)
    embed: bool  # holds the token embedding (stage 0): vocab x d parameters, no matmul
    head: bool  # holds ln_f and the LM head: vocab x d + vocab + 2 d parameters

    @property
    def params(self) -> int:
        p = self.blocks * self.block_params
        if self.embed:
            p += self.vocab * self.d_model
        if self.head:
            p += self.vocab * self.d_model + self.vocab + 2 * self.d_model
        return p

    @property
    def matmul_params(self) -> int:
        """Parameters a forward multiplies by (autocast keeps a 16-bit copy of each): all of a
        block's but ln_1 (2 d) and the MLP's biases (4 d + d); the LM head's weight."""
        return self.blocks * max(0, self.block_params - 7 * self.d_model) + (self.vocab * self.d_model if self.head else 0)


@dataclass(frozen=True)
class TrainingSetup:
    """How the stage trains: what decides its memory besides its shape."""

    tokens_per_micro_batch: int  # micro_batch x seq_len
    in_flight: int  # micro-batches whose activations the stage holds at once
    seq_len: int = 0  # for the attention mask a micro-batch keeps (micro_batch x seq_len^2 values)
    precision: str = "bf16"  # 'fp32', 'bf16' or 'fp16' (autocast)
    eight_bit_adam: bool = False
    checkpoint_segment: int = 0  # pipeline.activation_checkpointing: 0 none, K every K blocks


@dataclass(frozen=True)
class StageMemory:
    """Bytes of one replica of a stage, by kind."""

    weights: int
    gradients: int
    optimizer: int
    autocast_copies: int
    activations: int  # every micro-batch in flight
    transient: int  # one at a time: a segment recomputed, the head's logits and their gradient

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.autocast_copies + self.activations
                + self.transient)

    def describe(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("autocast copies", self.autocast_copies), ("activations", self.activations),
                 ("transient", self.transient)]
        return f"{self.total / 1e9:.2f} GB (" + ", ".join(f"{name} {n / 1e9:.2f}" for name, n in parts if n) + ")"


def saved_per_micro_batch(shape: StageShape, setup: TrainingSetup) -> int:
    """Bytes autograd keeps between a micro-batch's forward and its backward (the input it
    received included), not counting 16-bit weight copies."""
    t, d = setup.tokens_per_micro_batch, shape.d_model
    k = setup.checkpoint_segment
    received = 0 if shape.embed else BLOCK_INPUT_BYTES * t * d
    if k:
        blocks = -(-shape.blocks // k) * BLOCK_INPUT_BYTES * t * d  # each segment's input
    else:
        blocks = shape.blocks * BLOCK_ACTIVATION_BYTES[setup.precision] * t * d
    head = (HEAD_BYTES_PER_VOCAB * t * shape.vocab + HEAD_BYTES_PER_D * t * d) if shape.head else 0
    mask = t * setup.seq_len * (4 if setup.precision == "fp32" else 2)  # (B, 1, T, T), the compute dtype
    return received + blocks + head + mask


def stage_memory(shape: StageShape, setup: TrainingSetup) -> StageMemory:
    """What one replica of `shape` needs, trained as `setup` says."""
    if setup.precision not in BLOCK_ACTIVATION_BYTES:
        raise ValueError(f"precision {setup.precision!r}: expected one of {sorted(BLOCK_ACTIVATION_BYTES)}")
    params, t, d, k = shape.params, setup.tokens_per_micro_batch, shape.d_model, setup.checkpoint_segment
    copy_bytes = 0 if setup.precision == "fp32" else 2  # a 16-bit copy per matmul weight under autocast
    head_copies = (shape.vocab * d if shape.head else 0) * copy_bytes
    block_copies = shape.matmul_params * copy_bytes - head_copies
    transient = 8 * t * shape.vocab if shape.head else 0
    if k:  # blocks keep no copies between forward and backward: made once while a forward or a
        # recomputation runs (autocast caches them for that long)
        autocast = head_copies * setup.in_flight
        transient += block_copies + min(k, shape.blocks) * BLOCK_ACTIVATION_BYTES[setup.precision] * t * d
    else:
        autocast = (block_copies + head_copies) * setup.in_flight
    return StageMemory(weights=4 * params, gradients=4 * params, optimizer=(2 if setup.eight_bit_adam else 8) * params,
                       autocast_copies=autocast, activations=setup.in_flight * saved_per_micro_batch(shape, setup),
                       transient=transient)
