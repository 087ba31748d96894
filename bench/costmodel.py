"""bench costmodel: the cost model's predicted step time against measured step times of real
CPU swarms whose workers are NOT paced by the model's formula.

Each scenario is a coordinator and 2 workers on this machine training the tiny flavour with
`scheduler.placement = "cost-model"`: the workers compute at whatever speed their threads reach
(no `--simulate-device`), probe their own device (a square matmul at join, one block of the
run's model after) and their links (loopback, or a shaped link: link.emulate_mbit); the
coordinator plans from those figures. In the last scenario the pipeline's bounds let the
scheduler choose one stage of both workers (data parallel: every replica runs the whole model,
and the stage averages through hivemind each step), which it predicts faster at the links'
speed. Since 2026-12-07 the coordinator times each averaging round and prices groups at that
rate (coordinator/ledger/averaging_rounds.py): the plan it then prefers waits for the next
complete checkpoint (every 2 steps there), so that run trains on two plans (`plans_run`, each
with its median step). predicted = the final plan's `predicted_step_s` at the end of the run
(with the figures measured by then), measured = the median step seconds of the steps that ran
on that plan, after the first STEPS_SKIPPED steps (loading, probes, re-plans). error_pct = 100 x
(predicted - measured) / measured: negative when the model is optimistic.

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
DATA_PARALLEL = {"min_stages": 1, "replicas_per_stage": 2, "checkpoint_every": 2}
DATA_PARALLEL_SCENARIO = "1+1 threads, loopback, 1 stage x 2 replicas allowed"
# name -> (threads of each of the 2 workers, [link] keys or "", more of small_run_toml's arguments)
SCENARIOS = {
    "1+1 threads, loopback": ((1, 1), "", {}),
    "1+2 threads, loopback": ((1, 2), "", {}),
    "1+1 threads, 20 Mbit/s 10 ms": ((1, 1), "emulate_mbit = 20\nemulate_latency_ms = 10\n", {}),
    DATA_PARALLEL_SCENARIO: ((1, 1), "", DATA_PARALLEL),
}


def measure(threads: tuple[int, ...], link: str, steps: int, workdir: Path, pipeline: dict | None = None) -> dict:
    """One scenario's predicted and measured step seconds (pipeline: more of small_run_toml's
    arguments)."""
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
    final = status["plan"]["ranges"]
    runs = plans_run(status["history"])
    seconds = [h["seconds"] for h in status["history"][STEPS_SKIPPED:] if _ranges(h) == final]
    if not seconds:
        raise RuntimeError(f"no step after the first {STEPS_SKIPPED} ran on the final plan {final} (plans run: "
                           f"{runs}); run more steps (logs in {workdir})")
    measured, predicted = statistics.median(seconds), status["plan"]["predicted_step_s"]
    return {"predicted_step_s": predicted, "measured_step_s": measured,
            "error_pct": 100 * (predicted - measured) / measured if predicted else None,
            "ranges": final, "replicas": [len(s.get("members") or []) for s in status["stages"]],
            "steps_measured": len(seconds), "plans_run": runs,
            "averaging_mbit": sorted(w["averaging_mbit"] for w in status["workers"] if w.get("averaging_mbit")),
            # what each worker's probes reported (the prediction's inputs): the rates of one block and of the head
            "devices": {w["name"]: {"stage": w["stage"], "block_tflops": w["device"].get("block_tflops"),
                                    "head_tflops": w["device"].get("head_tflops")} for w in status["workers"]}}


def _ranges(step: dict) -> list[list[int]]:
    """The layer ranges a closed step ran on (its row's per-stage detail)."""
    return [step["stages"][k].get("layers") for k in sorted(step["stages"], key=int)]


def plans_run(history: list[dict]) -> list[dict]:
    """Each plan the run trained on, in order: its ranges, its steps and their median seconds."""
    runs: list[dict] = []
    for h in history:
        if not runs or runs[-1]["ranges"] != _ranges(h):
            runs.append({"ranges": _ranges(h), "steps": [], "seconds": []})
        runs[-1]["steps"].append(h["step"])
        runs[-1]["seconds"].append(h["seconds"])
    return [{"ranges": r["ranges"], "steps": r["steps"], "median_step_s": statistics.median(r["seconds"])}
            for r in runs]


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
