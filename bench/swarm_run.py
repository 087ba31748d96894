"""Run a loopback swarm of real processes on a run config until it is done (for benchmarks)."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from local_swarm import LocalSwarm


def run_swarm(workdir: Path, config: Path | None, steps: int, workers: int, threads: int = 1,
              timeout_s: float = 900.0, settle_s: float = 0.0, device: str = "cpu",
              export_to: Path | None = None) -> dict:
    """Coordinator + `workers` workers on `config` (None: the embedded demo run), all on `device`;
    the coordinator's final status, taken `settle_s` after the run is done (so every worker's
    last heartbeat metrics are in). export_to: the trained model is exported there (a Hugging Face
    checkpoint, `gptjt export --coordinator`: each stage's weights the mean of its members') before
    the swarm stops. Logs stay in `workdir` (named in the error when the run fails)."""
    swarm = LocalSwarm(workdir, config, state=workdir / "run.db")
    try:
        swarm.start_coordinator(steps=steps, listen="127.0.0.1:0")
        for i in range(workers):
            swarm.start_worker(f"bench-{i}", threads=threads, device=device)
        status = swarm.wait(lambda s: s["phase"] == "done", timeout_s, f"the swarm to finish (logs in {workdir})",
                            check_alive=True)
        if settle_s:
            time.sleep(settle_s)
            status = swarm.status()
        if export_to is not None:
            swarm.export(export_to)
    finally:
        swarm.stop()
    return status


def keep_workdir(workdir: Path, prefix: str) -> Path:
    """A copy of a failed run's directory (its processes' logs, ledger, store) in the system's temp
    folder, named `prefix` + a unique tail, so that it outlives the run's temporary directory."""
    kept = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(workdir, kept, dirs_exist_ok=True)
    return kept


def steady_tokens_per_s(status: dict, skip: int = 1) -> float:
    """Tokens over seconds of the closed steps after the first `skip` (loading, warm-up)."""
    history = status["history"][skip:]
    return sum(h["tokens"] for h in history) / sum(h["seconds"] for h in history)


def final_loss(status: dict, last: int = 3) -> float:
    """Mean loss of the last `last` steps (both runs of a comparison see the same batches)."""
    losses = [h["loss"] for h in status["history"]][-last:]
    return sum(losses) / len(losses)


def whole_run(workdir: Path) -> dict:
    """Closed steps, their seconds and the attempts they re-ran, over the whole run run_swarm ran
    in `workdir`, from its ledger: the status object lists only the newest 200 steps in full
    (coordinator/ledger/history.py HISTORY_STEPS), and a bench that divided a whole run's bytes by
    that count overstated them per step by steps / 200 (gradsync's full form, 321 steps: 1.6x)."""
    with contextlib.closing(sqlite3.connect(workdir / "run.db")) as db:
        steps, seconds, reruns = db.execute("SELECT COUNT(*), COALESCE(SUM(closed - opened), 0), "
                                            "COALESCE(SUM(attempts - 1), 0) FROM steps").fetchone()
    return {"steps": steps, "seconds": seconds, "step_reruns": reruns}
