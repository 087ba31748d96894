"""Small run configs for local swarms: the tiny flavour on the bundled text, fp32, fast heartbeats."""

from __future__ import annotations

from pathlib import Path


def small_run_toml(tmp: Path, steps: int = 3, num_stages: int = 2, global_batch: int = 4, micro_batch: int = 2,
                   seq_len: int = 64, port: int = 0, timeout_s: float = 3.0, extra: str = "",
                   checkpoint_every: int = 0, replicas_per_stage: int = 1, start_with_replicas: int = 1,
                   interval_s: float = 0.5, placement: str = "even", min_workers: int = 0,
                   source: str = "random:tiny:0", precision: str = "fp32", codec: str = "fp32",
                   eight_bit: bool = False, activation_checkpointing: str = "none", min_stages: int = 0,
                   max_stages: int = 0, max_in_flight: int = 0) -> Path:
    """tmp/run.toml: a small fp32 run of the tiny flavour on the bundled wiki text, with heartbeats
    fast enough for fault drills (tests and benchmarks). `extra` is appended to the [coordinator] table (more keys, or more sections).
    source, precision, codec (both directions), eight_bit and activation_checkpointing change the
    model and how it trains (the GPU drill runs random:gptj-6b:0 in bf16 with 8-bit AdamW).
    min_stages / max_stages: the stage counts a cost-model plan may choose (0: num_stages).
    max_in_flight: micro-batches a stage-0 worker leases at once (0: the pipeline's default).
    placement 'even' (the default here) keeps the layer ranges the drills expect; the
    cost-model scheduler has its own tests."""
    repo = Path(__file__).resolve().parent.parent
    path = tmp / "run.toml"
    path.write_text(f"""
name = "test-swarm"
[model]
source = "{source}"
[data]
num_shards = 2
shuffle_buffer = 0
[[data.sources]]
name = "wiki"
path = "{repo / 'data' / 'demo' / 'wiki.jsonl.gz'}"
weight = 1.0
[optim]
lr = 2e-3
warmup_steps = 1
eight_bit = {"true" if eight_bit else "false"}
[train]
global_batch = {global_batch}
micro_batch = {micro_batch}
seq_len = {seq_len}
steps = {steps}
precision = "{precision}"
checkpoint_every = {checkpoint_every}
[pipeline]
num_stages = {num_stages}
min_stages = {min_stages}
max_stages = {max_stages}
max_in_flight = {max_in_flight}
activation_codec = "{codec}"
gradient_codec = "{codec}"
activation_checkpointing = "{activation_checkpointing}"
replicas_per_stage = {replicas_per_stage}
start_with_replicas = {start_with_replicas}
[scheduler]
placement = "{placement}"
min_workers = {min_workers}
[coordinator]
listen = "127.0.0.1:{port}"
state_path = "run.db"
heartbeat_interval_s = {interval_s}
heartbeat_timeout_s = {timeout_s}
{extra}
""")
    return path
