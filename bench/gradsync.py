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
loss being the mean of the last 3 steps (same batches, same order). That is a training loss: with
local steps it is each replica's on its own share of the batch, on weights that have drifted
from their last average. heldout_loss_gap_pct is the same gap on what a user keeps: the final
model (exported from the swarm, `gptjt export --coordinator`: each stage the mean of its
replicas, one replica's before 2026-12-06's thirteenth session; the baseline's from train-local
or its swarm) scored with the training objective (UL2, the same examples for both) on
HELDOUT_SEQUENCES sequences of the bundled held-out text
(data/demo/heldout.jsonl.gz, never trained on; gptjt_core/evaluation.heldout_objective_loss).
Not causal perplexity: at these settings it rises over the run while the UL2 loss falls (its
docstring). The goal is judged on loss_gap_pct, as it was set; the held-out gap is beside it.

--quick: outer_every 40 over 81 steps (2 outer steps), every coordinate averaged.
Full form: 321 steps (to a loss well below the quick form's). Each (outer_every, outer_density)
in FULL_SWEEP is run: averaging.outer_density of each pseudo-gradient's coordinates per outer step,
the rest carried in each replica's residual (error feedback, gptjt_core/outer_sparsity.py). Bytes
per step are about 4 x steps / (outer steps x density) below fp32's (8-bit codes, ~1 % of scales
and codebooks): ~640x for (80, 0.5) and (110, 1), which send the same traffic (half the coordinates
at 4 outer steps, all of them at 2), and ~425x for (100, 1), which spends a third outer step on
the gap while staying above the 400x goal. The figures are of the one with the most
bytes saved within the loss goal, or with none within it the one with the smallest gap (all are
reported). That setting is then run REPEATS - 1 times more, and its figures are the medians of its
REPEATS runs, each from the run at that median (`repeats` lists every run): one run of one
setting moved its training gap by up to 1.35 points between runs (routing decides which replica
sees which micro-batch), so one run could not tell which side of the goal a setting is on. The
first of the REPEATS runs is the one the sweep chose it by, which favours it a little; the
other settings of the sweep have read well above the goal in every run so far. Steps and their
seconds are counted over the whole run from its ledger (the status object lists the newest
200 steps only). The baseline's
loss over 321 steps is train-local's on the same config: an every-step swarm with float64
buffers trains exactly as train-local does (tests/integration/test_replicas.py holds their
losses to 1e-5), and on 2 shared cores it takes ~3x as long. Its bytes per step are measured
on an every-step swarm of BASELINE_BYTES_STEPS steps (the all-reduce is the same every step).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.swarm_run import final_loss, run_swarm, whole_run
from gptjt_core.config import load_run_config
from gptjt_core.evaluation import heldout_objective_loss
from gptjt_core.model import GPTJStage, StageSpec, load_stage, model_config_for
from local_swarm import small_run_toml

DESCRIPTION = "gradient-sync bytes per optimizer step vs fp32 all-reduce (local steps + 8-bit), and the loss gap"

OUTER_EVERY = 40
GLOBAL_BATCH, MICRO_BATCH = 32, 4  # 8 micro-batches a step: each replica of a stage sees about 4
FULL_STEPS = 321  # ends on an outer step (at 320) for outer_every 40, 80 and 160
# (outer_every, outer_density). 8 outer steps at a quarter of the coordinates was the only full form
# until 2026-12-04; that day's sweep of (40, 0.25), (80, 0.5), (160, 1) at the same bytes (~635x,
# counted right) gave gaps of 4.21, 3.64 and 3.17 %: all coordinates rarely beat a few often, so
# (40, 0.25) gave way to dense averaging every 110 steps (2 outer steps in 321 as 160 has, the same
# bytes: 3.61 % against 160's 2.86 %, then 2.01 % against 3.62 %). 160 then gave way to 100: three
# outer steps (100, 200, 300) cost 1.5x the bytes (~425x, still >= 400x), and the last 3 steps, on
# which the training-loss gap is read, are 18-20 steps past an average instead of ~100 or ~160.
FULL_SWEEP = ((80, 0.5), (100, 1.0), (110, 1.0))
LOSS_GOAL_PCT = 2.0
REPEATS = 3  # runs of the setting the sweep picks; the full form's figures are their medians
BASELINE_BYTES_STEPS = 11
HELDOUT_SEQUENCES = 512  # of seq_len 32: 16k of the held-out text's ~75k tokens
HELDOUT = Path(__file__).resolve().parent.parent / "data" / "demo" / "heldout.jsonl.gz"


def _config(tmp: Path, mode: str, compression: str, steps: int, outer_every: int, outer: str = "") -> Path:
    return small_run_toml(
        tmp, steps=steps, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, seq_len=32, timeout_s=30.0,
        replicas_per_stage=2,
        start_with_replicas=2,
        extra=f'[averaging]\ncompression = "{compression}"\ntimeout_s = 10.0\nmatchmaking_s = 0.5\n'
              f'mode = "{mode}"\nouter_every = {outer_every}\n{outer}'
              f'[[data.heldout]]\nname = "heldout"\npath = "{HELDOUT}"\nweight = 1.0\n')


def _heldout_loss(model: GPTJStage, config: Path) -> float:
    """A whole model's training objective (UL2) on the first HELDOUT_SEQUENCES held-out sequences
    (gptjt_core/evaluation.heldout_objective_loss: the same examples for every model)."""
    return heldout_objective_loss(model, load_run_config(config), HELDOUT_SEQUENCES)["loss"]


def _local_final_loss(steps: int) -> dict:
    """train-local of the baseline's config for `steps` steps: its final loss (mean of the last 3)."""
    from gptjt_core.trainer import LocalTrainer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = _config(tmp, "every-step", "none", steps, OUTER_EVERY)
        trainer = LocalTrainer(load_run_config(config), tmp / "out")
        stats = [trainer.train_step() for _ in range(steps)]
        heldout = _heldout_loss(trainer.model, config)
    return {"final_loss": sum(s.loss for s in stats[-3:]) / 3, "seconds": sum(s.seconds for s in stats),
            "heldout_loss": heldout}


def _run(mode: str, compression: str, steps: int, outer_every: int, outer: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = _config(tmp, mode, compression, steps, outer_every, outer)
        export = tmp / "export"
        status = run_swarm(tmp, config, steps, workers=4, threads=1, settle_s=2.0, timeout_s=5400.0, export_to=export)
        run = whole_run(tmp)  # every closed step: the status object lists the newest 200
        n_layer = model_config_for(str(export)).n_layer
        heldout = _heldout_loss(load_stage(str(export), StageSpec(0, n_layer, embed=True, head=True)), config)
    workers = [w for w in status["workers"] if w["stage"] >= 0]
    # Failed rounds and re-run step attempts sent bytes too, and they are in the count: reported
    # beside it, so a ratio that moves between runs says why (a repeated round is a whole one).
    return {"bytes_per_replica": sum(w["metrics"]["averaging_bytes"] for w in workers) / len(workers),
            "final_loss": final_loss(status), "steps": run["steps"], "seconds": run["seconds"],
            "failed_rounds": status["event_counts"].get("averaging_failed", 0), "step_reruns": run["step_reruns"],
            "heldout_loss": heldout}


def settings(quick: bool) -> dict:
    common = {"stages": 2, "replicas_per_stage": 2, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH,
              "seq_len": 32, "baseline": "every-step, no compression"}
    if quick:
        return {**common, "outer_every": OUTER_EVERY, "steps": 2 * OUTER_EVERY + 1, "outer_density": 1.0,
                "chosen": "local-steps + 8bit-blockwise"}
    return {**common, "sweep": [list(p) for p in FULL_SWEEP], "steps": FULL_STEPS,
            "baseline_loss": f"train-local, {FULL_STEPS} steps", "baseline_bytes_steps": BASELINE_BYTES_STEPS,
            "repeats": REPEATS, "chosen": "local-steps + 8bit-blockwise + random-k (outer_density) with error feedback"}


def _chosen_name(density: float) -> str:
    sparse = f" + random-k {density:g} with error feedback" if density < 1 else ""
    return f"local-steps + 8bit-blockwise{sparse}"


def _compare(baseline: dict, chosen: dict) -> dict:
    fp32_per_step = baseline["bytes_per_replica"] / 2 / baseline["steps"]  # float64 buffers -> fp32 width
    chosen_per_step = chosen["bytes_per_replica"] / chosen["steps"]
    return {
        "grad_bytes_ratio_vs_fp32": fp32_per_step / chosen_per_step,
        "loss_gap_pct": abs(chosen["final_loss"] - baseline["final_loss"]) / baseline["final_loss"] * 100,
        "heldout_loss_gap_pct": abs(chosen["heldout_loss"] - baseline["heldout_loss"]) / baseline["heldout_loss"] * 100,
        "baseline_heldout_loss": baseline["heldout_loss"], "chosen_heldout_loss": chosen["heldout_loss"],
        "fp32_allreduce_bytes_per_step": fp32_per_step, "chosen_bytes_per_step": chosen_per_step,
        "baseline_final_loss": baseline["final_loss"], "chosen_final_loss": chosen["final_loss"],
        "baseline_seconds": baseline["seconds"], "chosen_seconds": chosen["seconds"],
        "chosen_failed_rounds": chosen["failed_rounds"], "chosen_step_reruns": chosen["step_reruns"],
    }


def run(quick: bool = False) -> dict:
    common = {"replicas_per_stage": 2, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH}
    if quick:
        steps = 2 * OUTER_EVERY + 1  # outer steps at outer_every and 2 x outer_every
        baseline = _run("every-step", "none", steps, OUTER_EVERY)
        chosen = _run("local-steps", "8bit-blockwise", steps, OUTER_EVERY)
        return {**_compare(baseline, chosen), "outer_every": OUTER_EVERY, "outer_density": 1.0, "steps": steps,
                "chosen": "local-steps + 8bit-blockwise", **common}
    baseline = {**_run("every-step", "none", BASELINE_BYTES_STEPS, OUTER_EVERY), **_local_final_loss(FULL_STEPS),
                "steps": BASELINE_BYTES_STEPS}  # bytes per step from the swarm, the loss from train-local
    sweep = [_chosen_run(baseline, outer_every, density) for outer_every, density in FULL_SWEEP]
    within = [s for s in sweep if s["loss_gap_pct"] <= LOSS_GOAL_PCT]
    first = (max(within, key=lambda s: s["grad_bytes_ratio_vs_fp32"]) if within
             else min(sweep, key=lambda s: s["loss_gap_pct"]))
    runs = [first] + [_chosen_run(baseline, first["outer_every"], first["outer_density"])
                      for _ in range(REPEATS - 1)]
    figures = _medians(runs)
    return {**figures, "steps": FULL_STEPS, "loss_goal_met": figures["loss_gap_pct"] <= LOSS_GOAL_PCT,
            "chosen": _chosen_name(first["outer_density"]), "repeats": [_summary(r) for r in runs],
            "sweep": [_summary(s) for s in sweep], **common}


def _chosen_run(baseline: dict, outer_every: int, density: float) -> dict:
    chosen = _run("local-steps", "8bit-blockwise", FULL_STEPS, outer_every, f"outer_density = {density}\n")
    return {**_compare(baseline, chosen), "outer_every": outer_every, "outer_density": density}


def _summary(run: dict) -> dict:
    return {k: run[k] for k in ("outer_every", "outer_density", "grad_bytes_ratio_vs_fp32", "loss_gap_pct",
                                "heldout_loss_gap_pct", "chosen_final_loss", "chosen_heldout_loss",
                                "chosen_failed_rounds", "chosen_step_reruns")}


# Each median figure with the figures that belong to the same run (a gap with the losses it is of).
_MEDIAN_GROUPS = (("loss_gap_pct", ("chosen_final_loss", "chosen_seconds", "chosen_failed_rounds",
                                    "chosen_step_reruns")),
                  ("heldout_loss_gap_pct", ("chosen_heldout_loss",)),
                  ("grad_bytes_ratio_vs_fp32", ("chosen_bytes_per_step",)))


def _medians(runs: list[dict]) -> dict:
    """The runs' median of each figure in _MEDIAN_GROUPS, taken with its group from the run at that
    median (an odd count of runs: the median is a run's own figure); the rest from the first run."""
    figures = dict(runs[0])
    for key, companions in _MEDIAN_GROUPS:
        middle = sorted(runs, key=lambda r: r[key])[len(runs) // 2]
        figures.update({k: middle[k] for k in (key, *companions)})
    return figures
