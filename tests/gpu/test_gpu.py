"""CUDA paths: the GPT-J 6B block benchmark, 8-bit AdamW, and mixed-precision training.

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
