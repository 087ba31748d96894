"""bench link: the 2-stage swarm over an emulated slow link, with fp16 and with the chosen codecs.

The link is 100 Mbit/s with 30 ms one-way latency, time-scaled so that communication over
compute matches GPT-J 6B cut into 2 stages on A100-class GPUs:
  GPT-J stage compute per micro-batch (1 x 2048 tokens): training FLOPs 6N + 6 L T d per
  token (N = 6.05e9, L = 28, T = 2048, d = 4096), half per stage, at A100_TFLOPS effective
  (312 bf16 peak x 45 % MFU) -> ~0.27 s. Its fp16 activations per direction: 2048 x 4096 x 2
  bytes = 16.8 MB -> 1.34 s at 100 Mbit/s, i.e. the link is ~4.9x slower than the compute.
  Here: the tiny model's slower stage's forward + backward per micro-batch is measured on one
  core (t_tiny); time runs s = t_tiny / t_gptj as fast, so the emulated link carries the tiny
  model's fp16 activations in s x 1.34 s and its latency is s x 30 ms.
slow_link_speedup = steady-state tokens/s with the chosen codecs (workers pick them per link
from measured bandwidth, link.adaptive_codecs) over tokens/s with fp16 on the same link.
loss_gap_pct = |final loss chosen - final loss fp16| / final loss fp16 x 100, final loss being
the mean of the last 3 steps (both runs see the same batches in the same order).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.stage_times import stage_seconds
from bench.step_timeline import step_timeline
from bench.swarm_run import final_loss, run_swarm, steady_tokens_per_s
from gptjt_core.codec_sizes import bytes_per_value
from local_swarm import small_run_toml

DESCRIPTION = "2-stage swarm at an emulated 100 Mbit/s, 30 ms link (scaled to GPT-J 6B / A100): codecs vs fp16"

LINK_MBIT, LATENCY_MS = 100.0, 30.0
A100_TFLOPS = 312 * 0.45  # bf16 peak x model FLOPs utilisation
GPTJ_PARAMS, GPTJ_LAYERS, GPTJ_D, GPTJ_T = 6.05e9, 28, 4096, 2048
CHOSEN = ("q3", "q3")  # (activation, gradient) codecs on a slow link
IN_FLIGHT = 6


def gptj_stage_seconds(stages: int = 2) -> float:
    flops_per_token = 6 * GPTJ_PARAMS + 6 * GPTJ_LAYERS * GPTJ_T * GPTJ_D
    return flops_per_token / stages * GPTJ_T / (A100_TFLOPS * 1e12)


def gptj_link_seconds() -> float:
    """fp16 activations of one micro-batch, one direction, at LINK_MBIT."""
    return GPTJ_T * GPTJ_D * 2 * 8 / (LINK_MBIT * 1e6)


def tiny_stage_seconds(micro_batch: int, seq_len: int, repeats: int = 5) -> tuple[float, int]:
    """Forward + backward of the slower half of the tiny model on one core, and its hidden size."""
    from gptjt_core.model import model_config_for

    config = model_config_for("random:tiny:0", "eager")
    half = config.n_layer // 2
    halves = [(0, half), (half, config.n_layer)]
    return max(stage_seconds("random:tiny:0", halves, micro_batch, seq_len, threads=1, repeats=repeats)), config.n_embd


def tiny_shape():
    """The tiny flavour as the scheduler's cost model sees it (parameters counted from its stages)."""
    from coordinator.cost_model import ModelShape
    from gptjt_core.model import StageSpec, load_stage, model_config_for

    config = model_config_for("random:tiny:0", "eager")

    def count(spec: StageSpec) -> int:
        return sum(p.numel() for p in load_stage("random:tiny:0", spec).parameters())

    n = config.n_layer
    layer = count(StageSpec(1, 2))
    return ModelShape(n_layer=n, d_model=config.n_embd, layer_params=layer,
                      embed_params=count(StageSpec(0, 1, embed=True)) - layer,
                      head_params=count(StageSpec(n - 1, n, head=True)) - layer)


def predicted_step_s(tiny_s: float, micro_batch: int, seq_len: int, micro_batches: int, mbit: float,
                     latency_ms: float, bytes_per_value: float) -> float:
    """The scheduler's cost model for this run: both workers at the rate the measured slower
    stage implies, one emulated link between them."""
    from coordinator.cost_model import Device, Link, Network, StagePlacement, Workload, predict_step

    shape = tiny_shape()
    half = shape.n_layer // 2
    tokens = micro_batch * seq_len
    # the slower stage is the last (its LM head): its FLOPs over its measured time is the rate
    tflops = 6 * ((shape.n_layer - half) * shape.layer_params + shape.head_params) * tokens / tiny_s / 1e12
    devices = [Device("stage0", tflops, 1e6, "a"), Device("stage1", tflops, 1e6, "b")]
    net = Network({("a", "b"): Link(latency_ms / 1e3, mbit / 1e3)}, inside=Link(0.0, 1e3))
    work = Workload(tokens_per_micro_batch=tokens, micro_batches=micro_batches, in_flight=IN_FLIGHT,
                    activation_bytes_per_value=bytes_per_value)
    plan = [StagePlacement(0, half, (0,)), StagePlacement(half, shape.n_layer, (1,))]
    return predict_step(plan, devices, net, shape, work).step_s


def settings(quick: bool) -> dict:
    return {"link_mbit_scaled_from": LINK_MBIT, "latency_ms_scaled_from": LATENCY_MS, "chosen": "/".join(CHOSEN),
            "micro_batch": 2, "seq_len": 64, "micro_batches_per_step": 16 if quick else 32,
            "steps": 6 if quick else 8, "max_in_flight": IN_FLIGHT, "worker_threads": 1}


def run(quick: bool = False) -> dict:
    micro_batch, seq_len = 2, 64  # ~0.25 s of compute per micro-batch on the slower stage here
    global_batch = micro_batch * (16 if quick else 32)
    steps = 6 if quick else 8
    tiny_s, hidden = tiny_stage_seconds(micro_batch, seq_len)
    scale = tiny_s / gptj_stage_seconds()
    tiny_fp16_bits = micro_batch * seq_len * hidden * 2 * 8
    mbit = tiny_fp16_bits / (scale * gptj_link_seconds()) / 1e6
    latency_ms = LATENCY_MS * scale
    runs = {}
    for name, link in (("fp16", "adaptive_codecs = false"),
                       ("chosen", f'adaptive_codecs = true\nslow_link_mbit = {10 * mbit:.6g}\n'
                                  f'slow_activation_codec = "{CHOSEN[0]}"\nslow_gradient_codec = "{CHOSEN[1]}"')):
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            # In flight: enough micro-batches to keep stage 0, the link and stage 1 all busy over a
            # link with a long round trip (the bandwidth-delay product); the same for both runs.
            config = small_run_toml(tmp, steps=steps, global_batch=global_batch, micro_batch=micro_batch,
                                    seq_len=seq_len, timeout_s=30.0, max_in_flight=IN_FLIGHT,
                                    extra=f"[link]\n{link}\nemulate_mbit = {mbit:.6g}\nemulate_latency_ms = "
                                          f"{latency_ms:.6g}\n")
            config.write_text(config.read_text().replace('_codec = "fp32"', '_codec = "fp16"'))
            status = run_swarm(tmp, config, steps, workers=2, threads=1, settle_s=2.0)
            timeline = step_timeline(tmp)
        first = next(w for w in status["workers"] if w["stage"] == 0)["metrics"]
        steady = status["history"][1:]
        codec = "fp16" if name == "fp16" else CHOSEN[0]
        runs[name] = {"tokens_per_s": steady_tokens_per_s(status), "final_loss": final_loss(status),
                      "step_s": sum(h["seconds"] for h in steady) / len(steady),
                      "predicted_step_s": predicted_step_s(tiny_s, micro_batch, seq_len, global_batch // micro_batch,
                                                           mbit, latency_ms, bytes_per_value(codec)),
                      "codecs": f"{first['activation_codec']}/{first['gradient_codec']}",
                      "measured_mbit": first["downstream_mbit"], **timeline}
    fp16, chosen = runs["fp16"], runs["chosen"]
    return {
        "slow_link_speedup": chosen["tokens_per_s"] / fp16["tokens_per_s"],
        "loss_gap_pct": abs(chosen["final_loss"] - fp16["final_loss"]) / fp16["final_loss"] * 100,
        "chosen_codecs": chosen["codecs"], "fp16_tokens_per_s": fp16["tokens_per_s"],
        "chosen_tokens_per_s": chosen["tokens_per_s"], "fp16_final_loss": fp16["final_loss"],
        "chosen_final_loss": chosen["final_loss"],
        "measured_mbit_fp16": fp16["measured_mbit"], "measured_mbit_chosen": chosen["measured_mbit"],
        # the scheduler's cost model (coordinator/cost_model.py) against the measured steps
        "step_s_fp16": fp16["step_s"], "predicted_step_s_fp16": fp16["predicted_step_s"],
        "step_s_chosen": chosen["step_s"], "predicted_step_s_chosen": chosen["predicted_step_s"],
        # where the chosen run's step goes (bench/step_timeline.py), and what the speedup would be
        # without the tail (all that overlapping steps could save: the fill and drain are one
        # micro-batch's round trip, which the next step's first forward waits for) and without any
        # bubble at all (n periods a step)
        **{f"{k}_chosen": v for k, v in chosen.items() if k in ("period_s", "first_commit_s", "tail_s", "bubble_s")},
        "speedup_without_tail": fp16["step_s"] / (chosen["step_s"] - chosen["tail_s"]),
        "speedup_without_bubble": fp16["step_s"] / (chosen["micro_batches"] * chosen["period_s"]),
        "emulated_mbit": mbit, "emulated_latency_ms": latency_ms, "time_scale": scale,
        "tiny_stage_s_per_micro_batch": tiny_s, "gptj_stage_s_per_micro_batch": gptj_stage_seconds(),
        "gptj_link_s_per_micro_batch_fp16": gptj_link_seconds(), "a100_tflops_effective": A100_TFLOPS,
        "steps": steps, "micro_batches_per_step": global_batch // micro_batch, "max_in_flight": IN_FLIGHT,
    }
