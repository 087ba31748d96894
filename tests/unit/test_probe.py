"""worker/probe.py's figures for the scheduler: the rate of one block and of the LM head of the run's
own model, at its micro-batch (CPU here; tests/gpu measures them on a GPU)."""

from __future__ import annotations

import math

import torch

from coordinator.scheduler import model_shape
from gptjt_core.demo_config import tiny_demo_config
from gptjt_core.model import GPTJStage, StageSpec, model_config_for
from gptjt_core.precision import resolve_precision
from worker.probe import measure_at_run_dtype, measure_head_tflops
from worker.simulated_device import SimulatedDevice


def _tiny():
    run = tiny_demo_config()
    return run, model_config_for(run.model.source, run.model.attn_implementation)


def test_the_head_probe_measures_the_parameters_the_cost_model_prices_it_by():
    """The cost model divides ModelShape.head_params by the head's rate: the probe must time a
    module of exactly those parameters (final norm + LM head with its bias)."""
    _, config = _tiny()
    head = GPTJStage(config, StageSpec(config.n_layer, config.n_layer, head=True))
    shape = model_shape(config.n_layer, config.n_embd, config.n_inner or 4 * config.n_embd, config.vocab_size)
    assert sum(p.numel() for p in head.parameters()) == shape.head_params


def test_the_run_dtype_figures_carry_a_block_and_a_head_rate():
    run, config = _tiny()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = run.train
        head = measure_head_tflops(config, "cpu", resolve_precision("fp32", "cpu"), t.micro_batch * t.seq_len,
                                   t.seq_len, seconds=0.05)
        figures = measure_at_run_dtype(run, "cpu")
    finally:
        torch.set_num_threads(before)
    assert math.isfinite(head) and head > 0
    assert figures["head_tflops"] > 0 and figures["block_tflops"] > 0 and figures["dtype"] == "fp32"


def test_a_simulated_device_reports_one_rate_for_blocks_and_head():
    """Its compute is paced by one formula for every parameter (worker/simulated_device.py)."""
    run, _ = _tiny()
    figures = measure_at_run_dtype(run, "cpu", SimulatedDevice.parse("2.5:16"))
    assert figures["block_tflops"] == figures["head_tflops"] == 2.5


def test_a_head_probe_that_fails_leaves_the_block_rate_to_price_the_head(monkeypatch):
    """A head whose logits do not fit beside a loaded stage must not cost the block's figure too
    (figures_for_the_plan would then keep the join's fp32 matmul peak for everything)."""
    import worker.probe as probe

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 412.00 MiB")

    monkeypatch.setattr(probe, "measure_head_tflops", out_of_memory)
    run, _ = _tiny()
    figures = measure_at_run_dtype(run, "cpu")
    assert figures["block_tflops"] > 0 and figures["head_tflops"] == 0.0
