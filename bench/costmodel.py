"""bench costmodel: the cost model's predicted step time against measured step times of real
CPU swarms whose workers are NOT paced by the model's formula.

Each scenario is a coordinator and 2 workers on this machine training the tiny flavour with
`scheduler.placement = "cost-model"`: the workers compute at whatever speed their threads reach
(no `--simulate-device`), probe their own device (a square matmul at join, one block of the
run's model after) and their links (loopback, or a shaped link: link.emulate_mbit); the
coordinator plans from those figures. In the last scenario the pipeline's bounds let the
scheduler choose one stage of both workers (data parallel: every replica runs the whole model,
and the stage averages through hivemind each step), which it predicts faster here. predicted = the plan's `predicted_step_s` at the end of
the run (the prediction of the plan that ran), measured = the median step seconds after the
first STEPS_SKIPPED steps (loading, probes, re-plans). error_pct = 100 x (predicted - measured)
/ measured: negative when the model is optimistic.

What the model does not see here, and so what the error contains: the workers share the
machine's cores with each other and the coordinator (each probes alone), Python and gRPC
overheads per micro-batch, the step's close (reports, the coordinator's decision) and, on 2
cores, oversubscription when the threads exceed the cores.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

DESCRIPTION = "cost model's predicted step time vs measured step time of unpaced CPU swarms (threads, shaped link)"

STEPS_SKIPPED = 2
# Pipeline bounds that let the scheduler choose one stage of 2 replicas (data parallel), which it
# then does on this model: each replica runs the whole model and the stage averages every step.
DATA_PARALLEL = {"min_stages": 1, "replicas_per_stage": 2}
DATA_PARALLEL_SCENARIO = "1+1 threads, loopback, 1 stage x 2 replicas allowed"
# name -> (threads of each of the 2 workers, [link] keys or "", small_run_toml's pipeline keys)
SCENARIOS = {
    "1+1 threads, loopback": ((1, 1), "", {}),
    "1+2 threads, loopback": ((1, 2), "", {}),
    "1+1 threads, 20 Mbit/s 10 ms": ((1, 1), "emulate_mbit = 20\nemulate_latency_ms = 10\n", {}),
    DATA_PARALLEL_SCENARIO: ((1, 1), "", DATA_PARALLEL),
}


def measure(threads: tuple[int, ...], link: str, steps: int, workdir: Path, pipeline: dict | None = None) -> dict:
    """One scenario's predicted and measured step seconds (pipeline: small_run_toml's keys)."""
    from local_swarm import LocalSwarm, small_run_toml

    extra = f"[link]\n{link}" if link else ""
    config = small_run_toml(workdir, steps=steps, global_batch=16, micro_batch=2, seq_len=64, timeout_s=30.0,
                            placement="cost-model", min_workers=len(threads), extra=extra, **(pipeline or {}))
    swarm = LocalSwarm(workdir, config, state=workdir / "run.db")
    try:
        swarm.start_coordinator(steps=steps, listen="127.0.0.1:0")
        for i, n in enumerate(threads):
            swarm.start_worker(f"w{i}-{n}t", threads=n)
        status = swarm.wait(lambda s: s["phase"] == "done", 600, f"the swarm to finish (logs in {workdir})",
                            check_alive=True)
    finally:
        swarm.stop()
    seconds = [h["seconds"] for h in status["history"][STEPS_SKIPPED:]]
    measured, predicted = statistics.median(seconds), status["plan"]["predicted_step_s"]
    return {"predicted_step_s": predicted, "measured_step_s": measured,
            "error_pct": 100 * (predicted - measured) / measured if predicted else None,
            "ranges": status["plan"]["ranges"], "replicas": [len(s.get("members") or []) for s in status["stages"]],
            "steps_measured": len(seconds)}


def run(quick: bool = False) -> dict:
    steps = 6 if quick else 12
    out: dict = {}
    for name, (threads, link, pipeline) in SCENARIOS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = measure(threads, link, steps, Path(tmp), pipeline)
    errors = [abs(v["error_pct"]) for v in out.values() if v["error_pct"] is not None]
    out["median_abs_error_pct"] = statistics.median(errors) if errors else None
    out["worst_abs_error_pct"] = max(errors) if errors else None
    out["machine_cores"] = os.cpu_count()
    out["steps"] = steps
    return out
