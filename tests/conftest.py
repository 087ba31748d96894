"""Shared fixtures: a random tiny checkpoint on disk, the offline tokenizer, small run configs."""

from __future__ import annotations

import os
import subprocess
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


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server (tests/postgres_server.py) for the session; skips, saying why,
    where none can start."""
    from tests.postgres_server import PostgresServer

    try:
        server = PostgresServer()
    except (ImportError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"no PostgreSQL server could start here ({e}); `.ci/run` installs Debian's postgresql")
    yield server
    server.stop()


class LedgerLocations:
    """Where a test's ledgers live: SQLite files under tmp_path, or, for the postgres backend, one
    new database per (tmp_path, name), the same one each time a test reopens it."""

    def __init__(self, server=None):
        self.server, self.made = server, {}

    def __call__(self, tmp_path: Path, name: str = "run.db"):
        if self.server is None:
            return tmp_path / name
        key = (str(tmp_path), name)
        if key not in self.made:
            self.made[key] = self.server.database()
        return self.made[key]


_LEDGER_AT = [LedgerLocations()]  # SQLite files, unless a test runs on both_ledger_backends


def at(tmp_path: Path, name: str = "run.db"):
    """Where this test's ledger `name` lives: a SQLite file under tmp_path, or with
    `pytest.mark.usefixtures("both_ledger_backends")` also a PostgreSQL database."""
    return _LEDGER_AT[0](tmp_path, name)


@pytest.fixture(params=["sqlite", "postgres"])
def both_ledger_backends(request):
    """Run a ledger test on both backends: the same statements and rules over SQLite and PostgreSQL."""
    _LEDGER_AT[0] = LedgerLocations(request.getfixturevalue("postgres_server") if request.param == "postgres" else None)
    yield request.param
    _LEDGER_AT[0] = LedgerLocations()
