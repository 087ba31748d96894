"""Shared fixtures: a random tiny checkpoint on disk, the offline tokenizer, small run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer():
    from gptjt_core.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """`random:tiny:7` written as a Hugging Face checkpoint (safetensors + config + tokenizer)."""
    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import StageSpec, load_stage, model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-ckpt")
    config = model_config_for("random:tiny:7")
    stage = load_stage("random:tiny:7", StageSpec(0, config.n_layer, embed=True, head=True))
    return export_checkpoint([stage.state_dict()], config, out, tokenizer=load_tokenizer())


def small_run(steps: int = 3, global_batch: int = 4, micro_batch: int = 2, seq_len: int = 64):
    """The tiny demo run shrunk for tests."""
    from gptjt_core.config import tiny_demo_config

    run = tiny_demo_config()
    run.train.steps, run.train.global_batch = steps, global_batch
    run.train.micro_batch, run.train.seq_len = micro_batch, seq_len
    run.optim.warmup_steps = min(run.optim.warmup_steps, steps)
    run.scheduler.min_workers = 0  # tests join (and measure) workers themselves
    return run


@pytest.fixture()
def swarms():
    """Swarms a test starts; each is closed (every process killed) when the test ends."""
    made = []
    yield made
    for swarm in made:
        swarm.close()
