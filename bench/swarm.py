"""bench swarm: a 2-stage loopback swarm's tokens/s over train-local's (same model, batch, data),
what stage-link security costs (auth_overhead_pct), and coordinator heartbeat latency with 500
simulated workers.

auth_overhead_pct: the same small 2-stage run with link.tls "on" (mutual TLS, stage
authentication) and "off" (plaintext), alternated within one invocation, median steady
tokens/s of each: 100 x (off - on) / off. Worker sessions are on in both (they have no off
switch); so is everything else."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.swarm_run import run_swarm

DESCRIPTION = "swarm vs train-local tokens/s on loopback; coordinator heartbeat p99 with 500 workers"


def local_tokens_per_s(steps: int) -> tuple[float, list[float]]:
    from gptjt_core.config import tiny_demo_config
    from gptjt_core.trainer import LocalTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = LocalTrainer(tiny_demo_config(), tmp)
        trainer.train_step()  # warm-up
        stats = [trainer.train_step() for _ in range(steps)]
    return statistics.median(s.tokens_per_s for s in stats), [s.loss for s in stats]


def swarm_tokens_per_s(steps: int, worker_threads: int) -> tuple[float, list[float]]:
    """Median per-step tokens/s of the demo run on a coordinator + 2 workers (first step excluded)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        status = run_swarm(Path(tmp_name), None, steps + 1, workers=2, threads=worker_threads, timeout_s=600)
    history = status["history"][1:]  # step 0 includes loading and channel warm-up
    return statistics.median(h["tokens"] / h["seconds"] for h in history), [h["loss"] for h in status["history"]]


def heartbeat_latency_ms(workers: int, seconds: float) -> dict:
    """Authenticated heartbeats from `workers` simulated workers, a status poller and the dashboard
    stream open at the same time (bench/heartbeat.py)."""
    from bench.heartbeat import measure

    m = measure(workers, seconds)
    return {"coordinator_heartbeat_p50_ms": m["heartbeat_p50_ms"], "coordinator_heartbeat_p99_ms": m["heartbeat_p99_ms"],
            "heartbeats_measured": m["heartbeats_measured"], "simulated_workers": workers}


def auth_overhead_pct(pairs: int, steps: int) -> dict:
    """Alternate runs with stage-link TLS on and off; the median steady tokens/s of each."""
    from bench.swarm_run import steady_tokens_per_s
    from local_swarm import small_run_toml

    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(pairs):
        for tls in ("on", "off"):
            with tempfile.TemporaryDirectory() as tmp_name:
                tmp = Path(tmp_name)
                config = small_run_toml(tmp, steps=steps, global_batch=8, micro_batch=2, seq_len=64,
                                        extra=f'[link]\ntls = "{tls}"')
                status = run_swarm(tmp, config, steps, workers=2, threads=1, timeout_s=600)
                rates[tls].append(steady_tokens_per_s(status))
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"auth_overhead_pct": round(100 * (off - on) / off, 2), "tls_on_tokens_per_s": round(on, 1),
            "tls_off_tokens_per_s": round(off, 1), "auth_runs_each": pairs}


def run(quick: bool = False) -> dict:
    steps = 5 if quick else 15
    local, local_losses = local_tokens_per_s(steps)
    swarm, swarm_losses = swarm_tokens_per_s(steps, worker_threads=2)
    result = {"swarm_vs_local_tokens_per_s": swarm / local, "swarm_tokens_per_s": swarm,
              "local_tokens_per_s": local, "steps_measured": steps,
              "same_losses": [round(x, 6) for x in swarm_losses[1:3]] == [round(x, 6) for x in local_losses[:2]]}
    result.update(auth_overhead_pct(2 if quick else 4, 8 if quick else 15))
    result.update(heartbeat_latency_ms(500, 8.0 if quick else 30.0))
    return result
