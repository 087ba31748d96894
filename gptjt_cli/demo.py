"""`gptjt demo`: a local swarm on loopback (coordinator + one worker per stage), trained, exported, sampled."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from gptjt_core.config import tiny_demo_config
from local_swarm import LocalSwarm

from . import tables
from .swarm_commands import export_from_swarm, fetch_status

MODEL_CARD_PROMPT = '"I love this!" Is it positive? A:'


def run_demo(out: Path, steps: int | None, device: str) -> int:
    from tqdm import tqdm

    run = tiny_demo_config()
    steps = steps or run.train.steps
    shutil.rmtree(out, ignore_errors=True)  # a demo always starts a fresh run
    out.mkdir(parents=True)
    state = out / "run.db"
    print(f"== gptjt demo: a local swarm on loopback: 1 coordinator + {run.pipeline.num_stages} workers, tiny "
          f"GPT-J ({run.model.source}), bundled demo data, {steps} steps of {run.train.global_batch} x "
          f"{run.train.seq_len} tokens, UL2 with the prefix-LM mask", flush=True)
    swarm = LocalSwarm(out, state=state)
    try:
        swarm.start_coordinator(steps=steps, listen="127.0.0.1:0")
        address = swarm.address
        print(f"coordinator at {address} (log {swarm.coordinator.log}); try: gptjt status --coordinator {address}")
        if swarm.dashboard_url:
            print(f"dashboard at {swarm.dashboard_url} (admin token in {state}.admin-token)")
        for i in range(run.pipeline.num_stages):
            # Each worker may use every core: the stages are rarely busy at the same moment.
            swarm.start_worker(f"demo-{i}", threads=0, device=device)
        bar = tqdm(total=steps, desc="swarm", unit="step", dynamic_ncols=True)
        status = fetch_status(address)
        while status["phase"] != "done":
            swarm.check_alive()
            time.sleep(1.0)
            status = fetch_status(address)
            bar.n = status["step"]
            if status["loss"] is not None:
                bar.set_postfix(loss=f"{status['loss']:.3f}", tok_s=f"{status['tokens_per_s']:,.0f}",
                                phase=status["phase"])
            bar.refresh()
        bar.close()
        curve = status["loss_curve"]  # the whole run (history holds only the newest steps)
        print(f"\n{tables.summary(status)}\nloss {curve[0]['loss']:.3f} -> {status['loss']:.3f}\n")
        print(tables.to_text(tables.stages_table(status), tables.workers_table(status), tables.tickets_table(status)))
        print()
        export_dir = export_from_swarm(address, str(out / "export"), admin_token=swarm.admin_token)
        print(f"exported the swarm's stages as a Hugging Face checkpoint: {export_dir}")
    finally:
        swarm.stop()
    _show_generation(run, export_dir)
    return 0


def _show_generation(run, export_dir: str) -> None:
    from transformers import pipeline

    from gptjt_core.evaluation import generate, perplexity
    from gptjt_core.model import StageSpec, load_stage, model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    config = model_config_for(export_dir)
    model = load_stage(export_dir, StageSpec(0, config.n_layer, embed=True, head=True))
    tokenizer = load_tokenizer(run.data.tokenizer)
    ppl = perplexity(model, run.data, tokenizer, run.train.seq_len, 16)
    print(f"held-out perplexity of the export: {ppl['perplexity']:,.1f}")
    generator = pipeline("text-generation", model=export_dir, device="cpu")
    text = generator(MODEL_CARD_PROMPT, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    print(f"transformers pipeline : {text!r}")
    print(f"gptjt prefix-LM (UL2) : {MODEL_CARD_PROMPT + generate(model, tokenizer, MODEL_CARD_PROMPT, 12)!r}")
    print("(a 4-layer model trained for two minutes: expect word salad, not answers)")


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out), args.steps, args.device)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a local swarm on loopback: train tiny GPT-J, export, generate")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the demo run's 60)")
    p.add_argument("--device", default="cpu", help="device for the workers (default cpu)")
    p.add_argument("--out", default="runs/demo", help="logs, ledger and export go here")
    p.set_defaults(func=cmd_demo)
