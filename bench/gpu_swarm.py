"""bench gpu-swarm: GPT-J 6B trained as a pipeline of real worker processes on one GPU.

The drill the 6B run needs before volunteers: a coordinator and one worker per stage on the
same CUDA device (4 stages of 7 layers), bf16 autocast, 8-bit AdamW, activation checkpointing
per block, seq 2048, a few steps of UL2 on the bundled text, from `random:gptj-6b:0` (the
GPT-J 6B shape with GPT-J's init: no hub on the GPU host). It reports, per stage, the torch
allocator's peak (`WorkerMetrics.peak_memory_bytes`, reset when the stage is ready) against
the memory model's prediction for that stage (coordinator/memory_model.py, through the
scheduler's own `workload(run)`); the swarm's steady tokens/s against `train-local` of the
same run on the same GPU (the whole model in one process: an H200 holds it); and the model
FLOPs utilisation of both against the measured bf16 matmul peak.

Without CUDA the benchmark is unavailable; `drill(TINY_CPU, ...)` runs the same code on the
tiny flavour on CPU (tests/integration/test_gpu_swarm_drill.py), where no allocator peak exists.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DESCRIPTION = "GPT-J 6B as a 4-stage swarm on one GPU: per-stage peak memory vs the memory model, tokens/s vs train-local, MFU"


@dataclass(frozen=True)
class Drill:
    """What the drill trains and how."""

    source: str  # model source: random:FLAVOUR:SEED
    device: str  # every process on this device ('cuda:0', 'cpu')
    stages: int  # pipeline stages, one worker each, even layer split
    micro_batch: int  # sequences per micro-batch
    micro_batches: int  # micro-batches per step
    seq_len: int
    steps: int  # optimizer steps; the first is excluded from tokens/s (loading, warm-up)
    precision: str  # train.precision
    activation_checkpointing: str  # pipeline.activation_checkpointing
    eight_bit: bool  # optim.eight_bit (bitsandbytes: CUDA only)
    codec: str  # stage-boundary codec, both directions
    threads: int = 1  # torch CPU threads per process (CPU drill)
    timeout_s: float = 900.0  # for the swarm to finish


SIX_B = Drill(source="random:gptj-6b:0", device="cuda:0", stages=4, micro_batch=1, micro_batches=4, seq_len=2048,
              steps=4, precision="bf16", activation_checkpointing="block", eight_bit=True, codec="bf16")
TINY_CPU = Drill(source="random:tiny:0", device="cpu", stages=2, micro_batch=2, micro_batches=4, seq_len=128,
                 steps=3, precision="fp32", activation_checkpointing="block", eight_bit=False, codec="fp32",
                 timeout_s=300.0)


def model_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward model FLOPs per token of a GPT-J: its blocks as bench gpu-block counts
    one (block_flops), plus the LM head (d x vocab, 3x its forward). Activation checkpointing's
    recomputation is not counted: MFU counts the model's work, not the hardware's."""
    from bench.gpu_block import block_flops

    d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
    return config.n_layer * block_flops(d, inner, seq_len, 1) / seq_len + 3 * 2 * d * config.vocab_size


def peak_tflops(device: str) -> float:
    """The device's measured dense matmul rate at the compute dtype MFU is quoted against."""
    import torch

    if torch.device(device).type == "cuda":
        from bench.gpu_block import matmul_peak_tflops

        return matmul_peak_tflops()
    from worker.probe import measure_matmul_tflops

    return measure_matmul_tflops(torch.device("cpu"), torch.float32, seconds=1.0)


def run_config(d: Drill, workdir: Path) -> Path:
    from local_swarm import small_run_toml

    # heartbeats every second, 60 s before a worker is declared dead: a 6B stage takes a while to load
    return small_run_toml(workdir, steps=d.steps, num_stages=d.stages, global_batch=d.micro_batch * d.micro_batches,
                          micro_batch=d.micro_batch, seq_len=d.seq_len, source=d.source, precision=d.precision,
                          codec=d.codec, eight_bit=d.eight_bit, activation_checkpointing=d.activation_checkpointing,
                          interval_s=1.0, timeout_s=60.0)


def stage_memory(status: dict, run) -> list[dict]:
    """Per stage: its layers, the memory model's prediction and the worker's measured peak."""
    from coordinator.cost_model import stage_memory_of
    from coordinator.scheduler import model_shape, workload
    from gptjt_core.model import model_config_for

    config = model_config_for(run.model.source)
    shape = model_shape(config.n_layer, config.n_embd, config.n_inner or 4 * config.n_embd, config.vocab_size)
    work = workload(run)
    by_stage = {w["stage"]: w for w in status["workers"] if w["stage"] >= 0}
    out = []
    for st in status["stages"]:
        predicted = stage_memory_of(shape, work, st["start_layer"], st["end_layer"])
        worker = by_stage.get(st["index"])
        measured = worker["metrics"].get("peak_memory_bytes", 0) if worker else 0
        out.append({"stage": st["index"], "layers": [st["start_layer"], st["end_layer"]],
                    "predicted_gb": round(predicted.total / 1e9, 3), "predicted": predicted.describe(),
                    "measured_peak_gb": round(measured / 1e9, 3) if measured else None,
                    "measured_over_predicted": round(measured / predicted.total, 3) if measured else None})
    return out


def local_tokens_per_s(d: Drill, config_path: Path) -> tuple[float, float]:
    """train-local of the same run on the same device: (median tokens/s after a warm-up step, peak bytes)."""
    import torch

    from gptjt_core.config import load_run_config
    from gptjt_core.trainer import LocalTrainer

    cuda = torch.device(d.device).type == "cuda"
    torch.set_num_threads(max(1, d.threads * d.stages))  # the swarm's threads in total, not more
    with tempfile.TemporaryDirectory() as tmp:
        trainer = LocalTrainer(load_run_config(config_path), tmp, device=d.device)
        trainer.train_step()  # warm-up: kernels, allocator
        if cuda:
            torch.cuda.reset_peak_memory_stats(d.device)
        rates = [trainer.train_step().tokens_per_s for _ in range(max(1, d.steps - 1))]
        peak = torch.cuda.max_memory_allocated(d.device) if cuda else 0
        del trainer
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(rates), peak


def drill(d: Drill, workdir: Path) -> dict:
    """Run the swarm, then train-local, on `d.device`; the figures."""
    from bench.swarm_run import run_swarm
    from gptjt_core.config import load_run_config
    from gptjt_core.model import model_config_for

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = run_config(d, workdir)
    run = load_run_config(config_path)
    status = run_swarm(workdir, config_path, d.steps, workers=d.stages, threads=d.threads, timeout_s=d.timeout_s,
                       settle_s=2.5, device=d.device)  # settle: the last heartbeats carry each worker's peak
    history = status["history"][1:]
    swarm = statistics.median(h["tokens"] / h["seconds"] for h in history)
    local, local_peak = local_tokens_per_s(d, config_path)
    flops = model_flops_per_token(model_config_for(run.model.source), d.seq_len)
    peak = peak_tflops(d.device)
    stages = stage_memory(status, run)
    ratios = [s["measured_over_predicted"] for s in stages if s["measured_over_predicted"] is not None]
    return {"drill": asdict(d), "steps_done": len(status["history"]), "losses": [h["loss"] for h in status["history"]],
            "swarm_tokens_per_s": swarm, "local_tokens_per_s": local, "swarm_vs_local_tokens_per_s": swarm / local,
            "matmul_peak_tflops": peak, "swarm_mfu": swarm * flops / (peak * 1e12),
            "local_mfu": local * flops / (peak * 1e12), "stages": stages,
            "memory_worst_measured_over_predicted": max(ratios, key=lambda r: abs(r - 1)) if ratios else None,
            "local_peak_gb": round(local_peak / 1e9, 3) if local_peak else None}


def run(quick: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available():
        from bench.registry import BenchmarkUnavailable

        raise BenchmarkUnavailable("bench gpu-swarm needs a CUDA GPU; none is visible (torch.cuda.is_available() "
                                   "is False). The same code runs on the tiny flavour on CPU in "
                                   "tests/integration/test_gpu_swarm_drill.py")
    d = replace(SIX_B, steps=3) if quick else SIX_B
    with tempfile.TemporaryDirectory() as tmp:
        result = drill(d, Path(tmp))
    result["gpu"] = torch.cuda.get_device_name()
    return result
