"""bench swarm: a 2-stage loopback swarm's tokens/s over train-local's (same model, batch, data),
what stage-link security costs (auth_overhead_pct), and coordinator heartbeat latency with 500
simulated workers.

swarm_vs_local_tokens_per_s: the demo run (tiny flavour, cost-model placement) on a coordinator +
WORKERS workers of WORKER_THREADS torch threads each, against train-local of the same run with
WORKERS x WORKER_THREADS threads: the same threads in total, on the same cores (the machine's
every core is shared by both sides' runs, one after the other). Both medians of per-step
tokens/s after a warm-up step; the thread counts and the machine's cores are in the output.
pipeline_bound_vs_local and swarm_vs_ideal_pipeline split that ratio in two: a perfect pipeline
of the swarm's own stages (each timed alone here, bench/stage_times.py) over train-local, and the
swarm over that perfect pipeline.

auth_overhead_pct: the same small 2-stage run with link.tls "on" (mutual TLS, stage
authentication) and "off" (plaintext), in pairs back to back within one invocation; the median
over pairs of 100 x (off - on) / off, each run's rate from its median step time (see
auth_overhead_pct). Worker sessions are on in both (they have no off switch); so is everything
else."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from bench.stage_times import ideal_pipeline_step_s, stage_seconds
from bench.swarm_run import run_swarm

DESCRIPTION = "swarm vs train-local tokens/s on loopback; coordinator heartbeat p99 with 500 workers"


WORKERS, WORKER_THREADS = 2, 1  # 2 threads in all: one per core of the 2-core machine the figures are from


def local_tokens_per_s(steps: int, threads: int) -> tuple[float, list[float]]:
    """Median per-step tokens/s of train-local on the demo run with `threads` torch threads."""
    import torch

    from gptjt_core.config import tiny_demo_config
    from gptjt_core.trainer import LocalTrainer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = LocalTrainer(tiny_demo_config(), tmp)
            trainer.train_step()  # warm-up
            stats = [trainer.train_step() for _ in range(steps)]
    finally:
        torch.set_num_threads(before)
    return statistics.median(s.tokens_per_s for s in stats), [s.loss for s in stats]


def swarm_tokens_per_s(steps: int, worker_threads: int) -> tuple[float, list[float], list[tuple[int, int]]]:
    """Median per-step tokens/s of the demo run on a coordinator + WORKERS workers (first step
    excluded), its losses, and the layer ranges of the stages it ran."""
    with tempfile.TemporaryDirectory() as tmp_name:
        status = run_swarm(Path(tmp_name), None, steps + 1, workers=WORKERS, threads=worker_threads, timeout_s=600)
    history = status["history"][1:]  # step 0 includes loading and channel warm-up
    ranges = [tuple(r) for r in status["plan"]["ranges"]]
    return (statistics.median(h["tokens"] / h["seconds"] for h in history), [h["loss"] for h in status["history"]],
            ranges)


def pipeline_bound(ranges: list[tuple[int, int]], local_tokens_per_s: float, swarm_tokens_per_s: float) -> dict:
    """The swarm's stages measured alone (WORKER_THREADS threads, the demo's micro-batch), the step
    a perfect pipeline of them would take, and both ratios that splits the swarm's shortfall
    into: what the split itself allows against train-local (`pipeline_bound_vs_local`: the tiny
    flavour's LM head, which no layer split can divide, is most of its compute) and what the
    swarm's links and protocol keep of that (`swarm_vs_ideal_pipeline`)."""
    from gptjt_core.demo_config import tiny_demo_config

    train = tiny_demo_config().train
    micro_batches = train.global_batch // train.micro_batch
    stage_s = stage_seconds(tiny_demo_config().model.source, ranges, train.micro_batch, train.seq_len,
                            threads=WORKER_THREADS)
    ideal_s = ideal_pipeline_step_s(stage_s, micro_batches)
    tokens = train.global_batch * train.seq_len
    return {"stage_ranges": [list(r) for r in ranges], "stage_s": stage_s, "micro_batches_per_step": micro_batches,
            "ideal_pipeline_step_s": ideal_s, "local_step_s": tokens / local_tokens_per_s,
            "swarm_step_s": tokens / swarm_tokens_per_s,
            "pipeline_bound_vs_local": tokens / ideal_s / local_tokens_per_s,
            "swarm_vs_ideal_pipeline": swarm_tokens_per_s * ideal_s / tokens}


def heartbeat_latency_ms(workers: int, seconds: float) -> dict:
    """Authenticated heartbeats from `workers` simulated workers, a status poller and the dashboard
    stream open at the same time (bench/heartbeat.py)."""
    from bench.heartbeat import measure

    m = measure(workers, seconds)
    return {"coordinator_heartbeat_p50_ms": m["heartbeat_p50_ms"], "coordinator_heartbeat_p99_ms": m["heartbeat_p99_ms"],
            "heartbeats_measured": m["heartbeats_measured"], "simulated_workers": workers}


def auth_overhead_pct(pairs: int, steps: int) -> dict:
    """`pairs` pairs of runs, link.tls "on" and "off" back to back, the order alternating from
    pair to pair so that a drift in the machine's speed over the invocation favours neither. Each
    run's tokens/s is its tokens a step over its median step time after the warm-up step (one slow
    step, another process's burst on 2 cores, does not move a median of 7 or 14); each pair gives
    100 x (off - on) / off, and the figure is the median over pairs. Before 2026-12-05 it compared
    the median of the "on" runs with that of the "off" runs, each over whole runs' seconds, and
    three quick runs of unchanged code read -2.05, 4.92 and 7.16."""
    from local_swarm import small_run_toml

    rates: dict[str, list[float]] = {"on": [], "off": []}
    pair_pcts: list[float] = []
    for pair in range(pairs):
        rate = {}
        for tls in (("on", "off") if pair % 2 == 0 else ("off", "on")):
            with tempfile.TemporaryDirectory() as tmp_name:
                tmp = Path(tmp_name)
                config = small_run_toml(tmp, steps=steps, global_batch=8, micro_batch=2, seq_len=64,
                                        extra=f'[link]\ntls = "{tls}"')
                status = run_swarm(tmp, config, steps, workers=2, threads=1, timeout_s=600)
                rate[tls] = median_step_tokens_per_s(status)
                rates[tls].append(rate[tls])
        pair_pcts.append(100 * (rate["off"] - rate["on"]) / rate["off"])
    return {"auth_overhead_pct": round(statistics.median(pair_pcts), 2),
            "auth_pair_pcts": [round(p, 2) for p in pair_pcts],
            "tls_on_tokens_per_s": round(statistics.median(rates["on"]), 1),
            "tls_off_tokens_per_s": round(statistics.median(rates["off"]), 1), "auth_runs_each": pairs}


def median_step_tokens_per_s(status: dict, skip: int = 1) -> float:
    """Tokens a step over the median step time of the closed steps after the first `skip`."""
    history = status["history"][skip:]
    if not history:
        raise RuntimeError(f"the run closed {len(status['history'])} step(s); a rate needs one after the "
                           f"first {skip} (raise its steps)")
    return statistics.median(h["tokens"] for h in history) / statistics.median(h["seconds"] for h in history)


def settings(quick: bool) -> dict:
    return {"steps_measured": 5 if quick else 15, "workers": WORKERS, "worker_threads": WORKER_THREADS,
            "auth_runs_each": 3 if quick else 5, "auth_steps": 8 if quick else 15,
            "heartbeat_workers": 500, "heartbeat_window_s": 8.0 if quick else 30.0}


def run(quick: bool = False) -> dict:
    steps = 5 if quick else 15
    local, local_losses = local_tokens_per_s(steps, threads=WORKERS * WORKER_THREADS)
    swarm, swarm_losses, ranges = swarm_tokens_per_s(steps, worker_threads=WORKER_THREADS)
    result = {"swarm_vs_local_tokens_per_s": swarm / local, "swarm_tokens_per_s": swarm,
              "local_tokens_per_s": local, "steps_measured": steps, "workers": WORKERS,
              "threads_per_worker": WORKER_THREADS, "local_threads": WORKERS * WORKER_THREADS,
              "machine_cores": os.cpu_count(),
              # the same batches in the same order; 1 vs 2 torch threads sum matmuls in another order,
              # so the losses agree to float32 rounding, not bit for bit
              "loss_max_rel_diff": max(abs(s - l) / abs(l) for s, l in zip(swarm_losses[1:3], local_losses[:2]))}
    result["same_losses"] = result["loss_max_rel_diff"] < 1e-4
    result.update(pipeline_bound(ranges, local, swarm))
    result.update(auth_overhead_pct(3 if quick else 5, 8 if quick else 15))
    result.update(heartbeat_latency_ms(500, 8.0 if quick else 30.0))
    return result
