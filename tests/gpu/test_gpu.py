"""CUDA paths: the GPT-J 6B block benchmark, 8-bit AdamW, mixed-precision training, and fp16 vs bf16 swarms.

Skipped without CUDA. Run on a GPU host with `pytest tests/gpu -s` (prints the figures).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gptj_6b_block_throughput_and_8bit_adamw():
    from bench.gpu_block import run

    result = run(quick=True)
    print(result)
    assert result["block_params"] == 201_355_264  # one GPT-J 6B layer
    assert 0.2 < result["mfu_vs_measured_matmul"] <= 1.2
    assert result["adamw8bit_state_dtype"] == "torch.uint8" and result["adamw8bit_updated"]
    assert result["adamw8bit_state_bytes_per_param"] < 2.2  # two 8-bit moments + block scales
    # the block probe the scheduler plans with predicts the measured block within 25 %
    assert 0.8 < result["measured_over_predicted_block_probe"] < 1.25, result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_mixed_precision_on_cuda(tmp_path, precision):
    from gptjt_core.trainer import LocalTrainer
    from tests.conftest import small_run

    run = small_run(steps=3)
    run.train.precision = precision
    run.optim.eight_bit = True
    trainer = LocalTrainer(run, tmp_path, device="cuda")
    stats = [trainer.train_step() for _ in range(3)]
    assert all(math.isfinite(s.loss) for s in stats)
    assert next(trainer.model.parameters()).dtype == torch.float32  # fp32 master weights


def test_stage_parity_on_cuda(tiny_checkpoint):
    from gptjt_core.model import StageSpec, load_stage

    ids = torch.randint(0, 50257, (2, 64), device="cuda")
    prefix = torch.tensor([10, 0], device="cuda")
    whole = load_stage(str(tiny_checkpoint), StageSpec(0, 4, embed=True, head=True), device="cuda")
    h = ids
    for spec in StageSpec.even_split(4, 2):
        h = load_stage(str(tiny_checkpoint), spec, device="cuda")(h, prefix)
    with torch.no_grad():
        assert (whole(ids, prefix) - h).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_probe_measures_the_run_dtype_on_cuda(dtype):
    from bench.gpu_block import matmul_peak_tflops
    from worker.probe import probe_device

    probed = probe_device("cuda", dtype, seconds=0.5)
    print(probed)
    assert probed["kind"] == "cuda" and probed["memory_bytes"] > 1 << 30
    if dtype == torch.bfloat16:  # the probe's figure is what the scheduler divides FLOPs by: near the real peak
        peak = matmul_peak_tflops()
        assert 0.6 * peak < probed["matmul_tflops"] < 1.2 * peak, (probed, peak)
    else:
        assert probed["matmul_tflops"] > 5  # fp32 (TF32 off) on any data-centre GPU


def _gpu_swarm_losses(tmp_path, precision: str, steps: int) -> list[float]:
    """A 2-stage tiny swarm, both workers on cuda:0, at `precision` (fp16: the coordinator's loss
    scale; bf16: none); the closed steps' losses."""
    from tests.swarm import BIN, Swarm, swarm_toml

    if not (BIN / "gptjt-worker").exists():
        pytest.skip(f"needs the gptjt console scripts in {BIN} (pip install -e . in this environment)")
    workdir = tmp_path / precision
    workdir.mkdir()
    config = swarm_toml(workdir, steps=steps, global_batch=8, micro_batch=2, seq_len=128)
    config.write_text(config.read_text().replace('precision = "fp32"', f'precision = "{precision}"'))
    swarm = Swarm(workdir, config)
    try:
        swarm.start_coordinator()
        for name in ("s0", "s1"):
            swarm.start_worker(name, device="cuda:0").wait_for("joined", 180)
        status = swarm.wait(lambda s: s["phase"] == "done", 600, f"the {precision} run to finish")
    finally:
        swarm.close()
    return [h["loss"] for h in status["history"]]


def test_fp16_and_bf16_swarms_end_within_one_percent(tmp_path):
    """fp16 with the swarm's shared dynamic loss scale trains like bf16: after 50 steps of the
    tiny flavour their losses (mean of the last 5 steps) are within 1 % of each other."""
    steps = 50
    fp16 = _gpu_swarm_losses(tmp_path, "fp16", steps)
    bf16 = _gpu_swarm_losses(tmp_path, "bf16", steps)
    assert len(fp16) == len(bf16) == steps and all(math.isfinite(x) for x in fp16 + bf16)
    end16, end_bf = sum(fp16[-5:]) / 5, sum(bf16[-5:]) / 5
    print({"fp16_last5": end16, "bf16_last5": end_bf, "relative_gap": abs(end16 - end_bf) / end_bf})
    assert abs(end16 - end_bf) <= 0.01 * end_bf


def test_gptj_6b_swarm_drill_memory_and_throughput():
    """GPT-J 6B as 4 worker processes of 7 layers on this GPU (bf16, 8-bit AdamW, activation
    checkpointing per block, seq 2048): every stage's allocator peak within 10 % of the memory
    model's prediction, finite losses, and the figures `bench gpu-swarm` reports."""
    import json

    from bench.gpu_swarm import run
    from tests.swarm import BIN

    if not (BIN / "gptjt-worker").exists():
        pytest.skip(f"needs the gptjt console scripts in {BIN} (pip install -e . in this environment)")
    result = run(quick=True)
    print("gpu-swarm", json.dumps(result))
    assert result["steps_done"] == 3 and all(math.isfinite(x) for x in result["losses"])
    for stage in result["stages"]:
        assert stage["measured_over_predicted"] is not None, stage
        assert 0.9 <= stage["measured_over_predicted"] <= 1.1, stage
