"""Test helpers over the one swarm launcher (local_swarm), and the train-local reference a swarm must reproduce."""

from __future__ import annotations

import shutil
from pathlib import Path

from local_swarm import BIN, LocalSwarm, SwarmProcess, free_port, small_run_toml

Swarm = LocalSwarm  # the tests' names for them
Proc = SwarmProcess
swarm_toml = small_run_toml

__all__ = ["BIN", "Proc", "Swarm", "free_port", "local_losses", "swarm_toml"]


def local_losses(config: Path, steps: int) -> tuple[list[float], dict]:
    """train-local on the same run config: the reference the swarm must reproduce."""
    from gptjt_core.config import load_run_config
    from gptjt_core.trainer import LocalTrainer

    run = load_run_config(config)
    out = config.parent / "local"
    shutil.rmtree(out, ignore_errors=True)
    trainer = LocalTrainer(run, out)
    losses = [trainer.train_step().loss for _ in range(steps)]
    return losses, trainer.model.state_dict()
