"""What one churn simulation is set to (ChurnSettings, and the run config it gives the real
ledger) and what it produced (ChurnResult); bench/churn_sim.py runs it, bench/churn_static.py
runs the static-restart baseline on the same settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptjt_core.coordinator_config import CoordinatorConfig, SchedulerConfig
from gptjt_core.run_config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from gptjt_core.swarm_config import PipelineConfig


@dataclass
class ChurnSettings:
    """One simulated run."""
    workers: int = 1000  # volunteers at any time (each departure brings a newcomer)
    median_session_s: float = 7200.0
    session_shape: float = 0.5  # Weibull shape (churn_volunteers.py)
    hours: float = 2.0  # virtual time simulated
    churn: bool = True  # False: nobody leaves (the ceiling goodput is measured against)
    seed: int = 0
    min_stages: int = 4
    max_stages: int = 8
    replicas_per_stage: int = 8
    micro_batches_per_replica: int = 4  # global batch = this x replicas_per_stage sequences
    checkpoint_every: int = 10  # ~20 min of steps: volunteers leave by the hour
    heartbeat_interval_s: float = 10.0  # a big swarm's settings (deploy/README.md, "Size")
    heartbeat_timeout_s: float = 40.0
    peer_detect_s: float = 5.0
    rejoin_s: float = 60.0  # mean gap between a departure and the newcomer it brings
    checkpoint_bytes_per_param: float = 12.0  # fp32 weights and two fp32 AdamW moments
    # A worker's LinkProber measures the links it is asked for one at a time (an empty round trip,
    # then 2 x 256 KB): ~1-3 s a link over 0.1-1 Gbit/s at 50-200 ms; a request names up to 8.
    # Each live volunteer answers one request every probe_round_s (its first after its join's).
    probe_round_s: float = 20.0
    # scheduler.replan_every_s: searches merged within this long. With volunteers measuring links
    # all the time, 5 s searched ~530 times in the quick form's churned hour (0.12 s of coordinator
    # CPU per second); after the first step a plan that moves workers waits for a checkpoint
    # (~20 min here) anyway, and a vacancy is filled without a search.
    replan_every_s: float = 30.0
    # scheduler.replan_every_running_s: the same once the first step has opened (a plan that moves
    # workers then waits for a checkpoint, ~20 min here, and is searched again there). 60 s was
    # measured: seeds 0-2 of the quick form closed the same steps with 26 % fewer searches on
    # seed 0; 90 s and 120 s cost seed 0 9 % and 22 % of its tokens (cause not isolated).
    replan_every_running_s: float = 60.0
    # scheduler.layer_load_s: a GPT-J layer's checkpoint (201 M parameters x 12 bytes) over a
    # 0.5 Gbit/s link, the median of DT-FM's links between regions
    layer_load_s: float = 40.0


def run_config(s: ChurnSettings) -> RunConfig:
    """GPT-J 6B at the recipe's sequence length, on 24 GB-class cards (activation checkpointing
    per block, 8-bit AdamW), with the bounds and replicas of `s`; checked as a run file is."""
    return RunConfig(
        name="churn-sim",
        model=ModelConfig(source="random:gptj-6b:0"),
        data=DataConfig(num_shards=max(64, s.replicas_per_stage)),
        optim=OptimConfig(eight_bit=True),
        train=TrainConfig(global_batch=s.micro_batches_per_replica * s.replicas_per_stage, micro_batch=1,
                          seq_len=2048, steps=10_000_000, precision="bf16", checkpoint_every=s.checkpoint_every),
        pipeline=PipelineConfig(num_stages=s.min_stages, min_stages=s.min_stages, max_stages=s.max_stages,
                                replicas_per_stage=s.replicas_per_stage, activation_checkpointing="block"),
        coordinator=CoordinatorConfig(heartbeat_interval_s=s.heartbeat_interval_s,
                                      heartbeat_timeout_s=s.heartbeat_timeout_s),
        scheduler=SchedulerConfig(placement="cost-model", min_workers=0, replan_every_s=s.replan_every_s,
                                  replan_every_running_s=s.replan_every_running_s,
                                  layer_load_s=s.layer_load_s),
    )


@dataclass
class ChurnResult:
    """What one simulated run produced."""
    steps: int = 0  # steps closed and kept at the end
    tokens_per_s: float = 0.0
    useful_s: float = 0.0  # virtual seconds of steps that were kept
    rolled_back_s: float = 0.0  # of steps undone by rollbacks, and of attempts restarted
    unfinished_s: float = 0.0  # of the attempt still running when the simulated time ran out
    departures: int = 0
    placed_departures: int = 0
    rollbacks: int = 0
    replans: int = 0
    layers_moved: int = 0
    idle_standby_share: float = 0.0  # of alive worker-seconds, on standby
    ledger_cpu_s: float = 0.0
    heartbeat_cpu_per_beat_s: float = 0.0
    reaper_cpu_per_sim_s: float = 0.0  # the reaper's passes between the simulation's ticks (idle ones)
    mean_alive: float = 0.0
    seconds: float = 0.0
    wall_s: float = 0.0
    stage_counts: list = field(default_factory=list)  # stage counts the plans had, in order
