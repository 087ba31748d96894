"""bench local: the single-process baseline that later swarm figures are ratios against."""

from __future__ import annotations

import statistics
import tempfile

import torch

DESCRIPTION = "train-local tokens/s on the tiny flavour, and stage-parity error vs GPTJForCausalLM"


def stage_parity_max_abs_err(checkpoint_dir: str, seq_len: int = 64, batch: int = 2) -> float:
    """Largest |logit difference| between chained 2-stage gptjt and transformers' GPTJForCausalLM."""
    from transformers import GPTJForCausalLM

    from gptjt_core.model import StageSpec, load_stage, model_config_for

    config = model_config_for(checkpoint_dir)
    reference = GPTJForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 50257, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    prefix = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        h = ids
        for spec in StageSpec.even_split(config.n_layer, 2):
            h = load_stage(checkpoint_dir, spec).eval()(h, prefix)
        expected = reference(ids).logits
    return float((h - expected).abs().max())


def settings(quick: bool) -> dict:
    return {"flavour": "tiny", "model": "the embedded tiny demo run", "steps_measured": 4 if quick else 12,
            "warm_up_steps": 1, "device": "cpu"}


def run(quick: bool = False) -> dict:
    from gptjt_core.config import tiny_demo_config
    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import StageSpec, load_stage, model_config_for
    from gptjt_core.trainer import LocalTrainer

    run_cfg = tiny_demo_config()
    measured = 4 if quick else 12
    run_cfg.train.steps = measured + 1
    with tempfile.TemporaryDirectory() as tmp:
        trainer = LocalTrainer(run_cfg, f"{tmp}/run")
        trainer.train_step()  # warm-up: data readers, allocator, kernels
        steps = [trainer.train_step() for _ in range(measured)]
        source = run_cfg.model.source
        config = model_config_for(source)
        full = load_stage(source, StageSpec(0, config.n_layer, embed=True, head=True))
        export_checkpoint([full.state_dict()], config, f"{tmp}/ckpt")
        parity = stage_parity_max_abs_err(f"{tmp}/ckpt")
    rates = [s.tokens_per_s for s in steps]
    return {
        "tokens_per_s": statistics.median(rates),
        "step_seconds_median": statistics.median(s.seconds for s in steps),
        "stage_parity_max_abs_err": parity,
        "loss_first": steps[0].loss,
        "loss_last": steps[-1].loss,
        "steps_measured": measured,
        "global_batch": run_cfg.train.global_batch,
        "micro_batch": run_cfg.train.micro_batch,
        "seq_len": run_cfg.train.seq_len,
        "flavour": "tiny",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
    }
