"""Single-machine commands: train-local, eval, export, init, demo, config."""

from __future__ import annotations

import argparse
import json
import sys

from gptjt_core.config import RunConfig, load_run_config, tiny_demo_config

MODEL_CARD_PROMPT = '"I love this!" Is it positive? A:'


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The run config from --config, else the embedded tiny demo; --steps overrides."""
    run = load_run_config(args.config) if getattr(args, "config", None) else tiny_demo_config()
    if getattr(args, "steps", None) is not None:
        if args.steps < 1:
            raise ValueError(f"--steps {args.steps} must be >= 1")
        run.train.steps = args.steps
        run.optim.warmup_steps = min(run.optim.warmup_steps, args.steps)
    return run


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config TOML (default: the embedded tiny demo run)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")


def cmd_train_local(args: argparse.Namespace) -> int:
    from gptjt_core.trainer import LocalTrainer

    run = _run_config(args)
    trainer = LocalTrainer(run, args.out, device=args.device, ul2=not args.no_ul2)
    resumed = trainer.resume() if args.resume else 0
    print(f"gptjt train-local: run {run.name!r}, model {run.model.source}, "
          f"{run.train.global_batch} seq x {run.train.seq_len} tokens per step, "
          f"precision {trainer.precision.name} on {trainer.device}"
          + (f", resumed at step {resumed}" if resumed else ""), flush=True)
    stats = trainer.fit(progress=not args.quiet)
    if stats:
        first, last = trainer.history[0], trainer.history[-1]
        rate = sum(s.tokens for s in stats) / max(sum(s.seconds for s in stats), 1e-9)
        print(f"steps {last['step']}: loss {first['loss']:.3f} -> {last['loss']:.3f}, "
              f"{rate:,.0f} tokens/s; checkpoint {trainer.latest_checkpoint()}")
    if args.export:
        print(f"exported Hugging Face checkpoint to {trainer.export(args.export)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import StageSpec, load_stage, model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    if args.anchor and not args.store:
        raise ValueError("--anchor picks what to export from a checkpoint store: give it with --store ROOT (an "
                         "export from --coordinator is already the replicas' mean)")
    if args.coordinator:
        from .operator_client import admin_token, read_token
        from .swarm_commands import export_from_swarm

        out = export_from_swarm(args.coordinator, args.out, args.dtype, admin_token(args.admin_token),
                                read_token(args.read_token))
        print(f"exported the swarm at {args.coordinator} -> {out} ({args.dtype})")
        return 0
    if args.store:
        from .swarm_commands import export_from_store

        run = _run_config(args)
        out = export_from_store(args.store, args.out, args.step, run.model.source, run.data.tokenizer, args.dtype,
                                anchor=args.anchor)
        print(f"exported the checkpoint store {args.store} -> {out} ({args.dtype})")
        return 0
    if not args.checkpoint:
        raise ValueError("give --checkpoint DIR (a trainer or HF checkpoint), --coordinator HOST:PORT (a live "
                         "swarm) or --store ROOT (a swarm's checkpoint store)")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    source = str(args.checkpoint)
    config = model_config_for(source)
    stage = load_stage(source, StageSpec(0, config.n_layer, embed=True, head=True))
    out = export_checkpoint([stage.state_dict()], config, args.out, tokenizer=load_tokenizer(args.tokenizer),
                            dtype=dtypes[args.dtype])
    print(f"exported {source} -> {out} ({args.dtype})")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a seeded random checkpoint of a flavour (what `random:FLAVOUR:SEED` loads)."""
    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import StageSpec, load_stage, model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    source = f"random:{args.flavour}:{args.seed}"
    config = model_config_for(source)
    stage = load_stage(source, StageSpec(0, config.n_layer, embed=True, head=True))
    out = export_checkpoint([stage.state_dict()], config, args.out, tokenizer=load_tokenizer())
    print(f"wrote {source} to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gptjt_core.evaluation import generate, perplexity
    from gptjt_core.model import StageSpec, load_stage, model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    run = _run_config(args)
    source = str(args.checkpoint)
    config = model_config_for(source)
    model = load_stage(source, StageSpec(0, config.n_layer, embed=True, head=True), device=args.device)
    tokenizer = load_tokenizer(run.data.tokenizer)
    result = perplexity(model, run.data, tokenizer, run.train.seq_len, args.sequences)
    result["prompt"] = args.prompt
    result["completion"] = generate(model, tokenizer, args.prompt, args.max_new_tokens,
                                    prefix_lm=not args.causal)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"held-out perplexity {result['perplexity']:.2f} (loss {result['loss']:.4f}, "
              f"{result['tokens']:,} tokens in {result['sequences']} sequences)")
        print(f"prompt: {args.prompt}\ncompletion: {result['completion']!r}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    run = _run_config(args)
    json.dump(run.to_dict(), sys.stdout, indent=2)
    print()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-local", help="single-process reference trainer (whole model, one stage)")
    _add_run_args(p)
    p.add_argument("--out", default="runs/local", help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-ul2", action="store_true", help="plain causal LM instead of UL2")
    p.add_argument("--export", help="also write a Hugging Face checkpoint here at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_local)

    p = sub.add_parser("eval", help="held-out perplexity and the model card's prompt")
    _add_run_args(p)
    p.add_argument("--checkpoint", required=True, help="HF checkpoint dir (export or trainer checkpoint)")
    p.add_argument("--sequences", type=int, default=32, help="held-out sequences to score")
    p.add_argument("--prompt", default=MODEL_CARD_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--causal", action="store_true", help="read the prompt causally, not as a UL2 prefix")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a Hugging Face checkpoint (+ tokenizer) from a checkpoint or a swarm")
    p.add_argument("--checkpoint", help="trainer checkpoint or HF checkpoint directory")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="gather the stages from a live swarm instead")
    p.add_argument("--admin-token", help="with --coordinator: the run's admin token, for the certificate TLS stage "
                   "links need (default: $GPTJT_ADMIN_TOKEN); it also reads the status")
    p.add_argument("--read-token", help="with --coordinator: the run's read token, where reading needs one "
                   "(default: $GPTJT_READ_TOKEN)")
    p.add_argument("--store", help="or read a swarm's checkpoint store (directory or fsspec URL)")
    p.add_argument("--step", type=int, help="with --store: which step (default: the newest complete one)")
    p.add_argument("--config", help="with --store: the run config (model source, tokenizer)")
    p.add_argument("--anchor", action="store_true", help="with --store, for a local-steps run: export the model "
                   "its replicas shared at the last outer step, not the checkpoint writer's own weights")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--tokenizer", default="gpt2-offline")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("init", help="write a seeded random checkpoint of a model flavour")
    p.add_argument("--flavour", default="tiny", choices=["tiny", "gptj-6b"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", help="print the resolved run config as JSON")
    _add_run_args(p)
    p.set_defaults(func=cmd_config)
