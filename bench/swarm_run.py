"""Run a loopback swarm of real processes on a run config until it is done (for benchmarks)."""

from __future__ import annotations

import time
from pathlib import Path

from gptjt_cli.local_swarm import LocalSwarm


def run_swarm(workdir: Path, config: Path, steps: int, workers: int, threads: int = 1,
              timeout_s: float = 900.0, settle_s: float = 0.0) -> dict:
    """Coordinator + `workers` workers on `config`; the coordinator's final status, taken
    `settle_s` after the run is done (so every worker's last heartbeat metrics are in). Logs
    stay in `workdir` (named in the error when the run fails)."""
    from coordinator.state import create_token_in
    from gptjt_cli.swarm_commands import fetch_status

    token = create_token_in(workdir / "run.db")
    swarm = LocalSwarm(workdir)
    try:
        address = swarm.start_coordinator(workdir / "run.db", steps, config=config)
        for i in range(workers):
            swarm.start_worker(token, f"bench-{i}", threads=threads)
        deadline = time.monotonic() + timeout_s
        while (status := fetch_status(address))["phase"] != "done":
            swarm.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the swarm did not finish in {timeout_s:.0f} s; logs in {workdir}")
            time.sleep(0.5)
        if settle_s:
            time.sleep(settle_s)
            status = fetch_status(address)
    finally:
        swarm.stop()
    return status


def steady_tokens_per_s(status: dict, skip: int = 1) -> float:
    """Tokens over seconds of the closed steps after the first `skip` (loading, warm-up)."""
    history = status["history"][skip:]
    return sum(h["tokens"] for h in history) / sum(h["seconds"] for h in history)


def final_loss(status: dict, last: int = 3) -> float:
    """Mean loss of the last `last` steps (both runs of a comparison see the same batches)."""
    losses = [h["loss"] for h in status["history"]][-last:]
    return sum(losses) / len(losses)
