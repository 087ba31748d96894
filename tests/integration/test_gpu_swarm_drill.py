"""The GPU drill's code on CPU: `bench gpu-swarm` runs a swarm of real workers, then train-local
of the same run, and reports per-stage memory against the memory model, tokens/s and MFU. Here
the tiny flavour on CPU (2 stages, activation checkpointing per block) proves the path a GPU host
runs with GPT-J 6B; the memory comparison itself needs CUDA's allocator (tests/gpu)."""

from __future__ import annotations

import math

from bench.gpu_swarm import TINY_CPU, drill, model_flops_per_token


def test_cpu_drill_runs_the_swarm_and_train_local(tmp_path):
    result = drill(TINY_CPU, tmp_path / "drill")
    assert result["steps_done"] == TINY_CPU.steps
    assert all(math.isfinite(x) for x in result["losses"])
    assert result["swarm_tokens_per_s"] > 0 and result["local_tokens_per_s"] > 0
    assert 0 < result["swarm_mfu"] < 1 and 0 < result["local_mfu"] < 1
    stages = result["stages"]
    assert [s["layers"] for s in stages] == [[0, 2], [2, 4]]  # the tiny flavour's 4 layers, even split
    # the prediction comes from the memory model for each stage; no CUDA allocator peak on CPU
    assert all(s["predicted_gb"] > 0 and s["measured_peak_gb"] is None for s in stages)
    assert stages[0]["predicted_gb"] != stages[1]["predicted_gb"]  # embedding vs head: different stages


def test_model_flops_per_token_of_gptj_6b():
    """6 N per token for GPT-J 6B's matmul parameters plus attention's score/value products."""
    from gptjt_core.config import flavour_config
    from gptjt_core.model import gptj_config

    config = gptj_config(flavour_config("gptj-6b"))
    d, seq = 4096, 2048
    matmul_params = 28 * (4 * d * d + 2 * d * 4 * d) + d * 50400
    expected = 6 * matmul_params + 3 * 28 * 4 * seq * d
    assert model_flops_per_token(config, seq) == expected
    assert 3.6e10 < expected < 4.0e10  # ~6 x 6.05e9 plus attention
