"""bench gpu-block: one gptj-6b-shaped block forward+backward at seq 2048 in bf16 (TFLOP/s, MFU),
and a bitsandbytes 8-bit AdamW step on CUDA. Needs a CUDA GPU."""

from __future__ import annotations

import statistics
import time

import torch

DESCRIPTION = "GPT-J 6B block fwd+bwd TFLOP/s and MFU at seq 2048 bf16; 8-bit AdamW step on CUDA"


def _cuda_time(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def matmul_peak_tflops(n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 dense matmul rate: the achievable peak MFU is quoted against."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    _cuda_time(lambda: a @ b, 3)
    return 2 * n**3 / statistics.median(_cuda_time(lambda: a @ b, iters)) / 1e12


def block_flops(d: int, inner: int, seq: int, batch: int) -> float:
    """Model FLOPs of one GPT-J block, forward + backward (3x forward), for `batch` sequences.

    Per token forward: 2 * (4 d^2 attention projections + 2 d * inner MLP) for the matmuls,
    plus 4 * seq * d for the score and value products (full square, as the kernel computes).
    """
    per_token_fwd = 2 * (4 * d * d + 2 * d * inner) + 4 * seq * d
    return 3 * per_token_fwd * seq * batch


def block_fwd_bwd(seq: int = 2048, batch: int = 1, iters: int = 10) -> dict:
    from gptjt_core.config import flavour_config
    from gptjt_core.model import GPTJStage, StageSpec, gptj_config

    config = gptj_config({**flavour_config("gptj-6b"), "n_layer": 1}, attn_implementation="sdpa")
    stage = GPTJStage(config, StageSpec(0, 1)).cuda()  # fp32 master weights, bf16 autocast
    x = torch.randn(batch, seq, config.n_embd, device="cuda", requires_grad=True)
    prefix = torch.full((batch,), seq // 2, device="cuda", dtype=torch.long)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = stage(x, prefix)
        out.float().pow(2).mean().backward()

    _cuda_time(step, 3)
    seconds = statistics.median(_cuda_time(step, iters))
    inner = config.n_inner or 4 * config.n_embd
    tflops = block_flops(config.n_embd, inner, seq, batch) / seconds / 1e12
    return {"block_fwd_bwd_ms": seconds * 1e3, "block_tflops": tflops,
            "block_params": sum(p.numel() for p in stage.parameters())}


def adamw_8bit_step(numel: int = 201_000_000) -> dict:
    """One bnb AdamW8bit step on a GPT-J-layer-sized parameter: time and state bytes."""
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.randn(numel, device="cuda"))
    opt = bnb.optim.AdamW8bit([p], lr=1e-5)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    state = opt.state[p]
    state_bytes = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return {"adamw8bit_step_ms": (time.perf_counter() - t0) * 1e3,
            "adamw8bit_state_bytes_per_param": state_bytes / numel,
            "adamw8bit_state_dtype": str(state["state1"].dtype),
            "adamw8bit_updated": bool((p.detach() != before).any())}


def settings(quick: bool) -> dict:
    return {"flavour": "gptj-6b, one block", "seq": 2048, "batch": 1, "precision": "bf16 autocast, fp32 master",
            "matmul_iters": 10 if quick else 30, "block_iters": 5 if quick else 20, "adamw8bit_params": 201_000_000}


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        from bench.registry import BenchmarkUnavailable

        raise BenchmarkUnavailable("bench gpu-block needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    peak = matmul_peak_tflops(iters=10 if quick else 30)
    block = block_fwd_bwd(iters=5 if quick else 20)
    result = {"gpu": torch.cuda.get_device_name(), "matmul_bf16_tflops": peak, **block,
              "mfu_vs_measured_matmul": block["block_tflops"] / peak}
    result.update(adamw_8bit_step())
    result.update(cost_model_check(result["block_fwd_bwd_ms"]))
    return result


def cost_model_check(measured_ms: float, seq: int = 2048, batch: int = 1) -> dict:
    """What the scheduler would predict for this block from the worker's own probes: the cost
    model's compute term (6 x matmul params x tokens / rate) against the measured forward +
    backward, once with the square-matmul peak (optimistic: it leaves out attention and
    kernel efficiency) and once with the block probe the worker now reports after joining."""
    from coordinator.cost_model import Device, ModelShape, StagePlacement, Workload, stage_compute_s
    from gptjt_core.config import flavour_config
    from gptjt_core.model import gptj_config
    from gptjt_core.precision import resolve_precision
    from worker.probe import measure_block_tflops, probe_device

    probed = probe_device("cuda", torch.bfloat16, seconds=0.5)
    config = gptj_config(flavour_config("gptj-6b"), attn_implementation="sdpa")
    block = measure_block_tflops(config, "cuda", resolve_precision("bf16", "cuda"), seq * batch, seq)
    model = ModelShape.gptj_6b()
    work = Workload(tokens_per_micro_batch=seq * batch, micro_batches=1, in_flight=1)

    def predicted_ms(tflops: float) -> float:
        device = Device("probe", tflops, probed["memory_bytes"] / 1e9, "here")
        return stage_compute_s(model, work, StagePlacement(1, 2, (0,)), [device]) * 1e3

    return {"probe_bf16_tflops": probed["matmul_tflops"], "probe_block_tflops": block,
            "cost_model_block_ms_from_matmul_peak": predicted_ms(probed["matmul_tflops"]),
            "cost_model_block_ms_from_block_probe": predicted_ms(block),
            "measured_over_predicted_matmul_peak": measured_ms / predicted_ms(probed["matmul_tflops"]),
            "measured_over_predicted_block_probe": measured_ms / predicted_ms(block)}
