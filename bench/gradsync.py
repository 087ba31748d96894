"""bench gradsync: bytes a stage replica sends to sync gradients per optimizer step, and the
loss that costs, on a 2-stage x 2-replica loopback swarm.

Baseline: averaging.mode "every-step" with no compression: replicas all-reduce their
gradients at every step (hivemind butterfly all-reduce; buffers are float64 there so that
replicas stay bit-identical; its bytes are reported at fp32 width, i.e. halved, which is what
an fp32 all-reduce of the same tensors sends). Chosen: averaging.mode "local-steps"
(DiLoCo-style: each replica steps on its own share of the batch and the replicas average
their pseudo-gradients every outer_every steps) with 8-bit blockwise compression.
grad_bytes_ratio_vs_fp32 = fp32 all-reduce bytes per optimizer step / chosen bytes per
optimizer step, both measured: every replica counts the tensor bytes its averaging rounds
send (parts out and averaged parts back) and reports them in its heartbeat.
loss_gap_pct = |final loss chosen - final loss baseline| / final loss baseline x 100, final
loss being the mean of the last 3 steps (same batches, same order).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.swarm_run import final_loss, run_swarm
from local_swarm import small_run_toml

DESCRIPTION = "gradient-sync bytes per optimizer step vs fp32 all-reduce (local steps + 8-bit), and the loss gap"

OUTER_EVERY = 40
GLOBAL_BATCH, MICRO_BATCH = 32, 4  # 8 micro-batches a step: each replica of a stage sees about 4


def _run(mode: str, compression: str, steps: int, outer_every: int, outer: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = small_run_toml(
            tmp, steps=steps, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, seq_len=32, timeout_s=30.0,
            replicas_per_stage=2,
            start_with_replicas=2,
            extra=f'[averaging]\ncompression = "{compression}"\ntimeout_s = 10.0\nmatchmaking_s = 0.5\n'
                  f'mode = "{mode}"\nouter_every = {outer_every}\n{outer}')
        status = run_swarm(tmp, config, steps, workers=4, threads=1, settle_s=2.0)
    workers = [w for w in status["workers"] if w["stage"] >= 0]
    return {"bytes_per_replica": sum(w["metrics"]["averaging_bytes"] for w in workers) / len(workers),
            "final_loss": final_loss(status), "steps": len(status["history"]),
            "seconds": sum(h["seconds"] for h in status["history"])}


def run(quick: bool = False) -> dict:
    outer_every = OUTER_EVERY if quick else 2 * OUTER_EVERY
    steps = 2 * outer_every + 1  # outer steps at outer_every and 2 x outer_every
    baseline = _run("every-step", "none", steps, outer_every)
    chosen = _run("local-steps", "8bit-blockwise", steps, outer_every)
    fp32_per_step = baseline["bytes_per_replica"] / 2 / baseline["steps"]  # float64 buffers -> fp32 width
    chosen_per_step = chosen["bytes_per_replica"] / chosen["steps"]
    return {
        "grad_bytes_ratio_vs_fp32": fp32_per_step / chosen_per_step,
        "loss_gap_pct": abs(chosen["final_loss"] - baseline["final_loss"]) / baseline["final_loss"] * 100,
        "fp32_allreduce_bytes_per_step": fp32_per_step, "chosen_bytes_per_step": chosen_per_step,
        "baseline_final_loss": baseline["final_loss"], "chosen_final_loss": chosen["final_loss"],
        "baseline_seconds": baseline["seconds"], "chosen_seconds": chosen["seconds"],
        "outer_every": outer_every, "steps": steps, "chosen": "local-steps + 8bit-blockwise",
        "replicas_per_stage": 2, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH,
    }
