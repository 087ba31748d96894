"""`gptjt plan`: the stage plan a coordinator would make for a run config and a set of devices,
and what each stage needs in memory (coordinator/memory_model.py), before any worker joins."""

from __future__ import annotations

import argparse
import json
import re

from gptjt_core.config import load_run_config


DEVICE = re.compile(r"^([^:,\s]+):([0-9.]+):([0-9.]+)(?:x([0-9]+))?$")


def parse_devices(text: str) -> list:
    """'NAME:TFLOPS:GB[xCOUNT],...' (e.g. 'a100:150:80x2,rtx3090:35:24x4') as scheduler WorkerViews."""
    from coordinator.scheduler import WorkerView

    workers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = DEVICE.match(item)
        try:
            name, tflops, memory_gb, n = match[1], float(match[2]), float(match[3]), int(match[4] or 1)
        except (TypeError, ValueError):
            raise ValueError(f"device {item!r}: expected NAME:TFLOPS:GB or NAME:TFLOPS:GBxCOUNT, e.g. "
                             "'rtx3090:35:24x4' (TFLOP/s at the run's precision, memory in GB)") from None
        if tflops <= 0 or memory_gb <= 0 or n < 1:
            raise ValueError(f"device {item!r}: TFLOP/s and GB must be > 0 and the count >= 1")
        workers += [WorkerView(f"{name}-{i}" if n > 1 else name, f"{name}-{i}:0", tflops, memory_gb)
                    for i in range(n)]
    if not workers:
        raise ValueError("--devices names no device; e.g. --devices 'a100:150:80x2,rtx3090:35:24x4'")
    return workers


def plan_report(run, workers: list) -> dict:
    """The plan (or why there is none) and every stage's memory, as a JSON-able dict."""
    from coordinator.cost_model import MEMORY_HEADROOM, stage_memory_of
    from coordinator.scheduler import decide, model_shape, plan_stages, workload
    from gptjt_core.model import model_config_for

    config = model_config_for(run.model.source)
    shape = model_shape(config.n_layer, config.n_embd, config.n_inner or 4 * config.n_embd, config.vocab_size)
    work = workload(run)
    decision = decide(run, shape, workers, [], None)
    if decision is not None:
        stages = [(s.start, s.end, list(s.workers)) for s in decision.stages]
    else:  # no plan: show the even split, so the operator sees what each stage would need
        stages = [(s.start, s.end, []) for s in plan_stages(config.n_layer, run.pipeline.num_stages)]
    memory_of = {w.id: w.memory_gb for w in workers}
    rows = []
    for i, (start, end, ids) in enumerate(stages):
        m = stage_memory_of(shape, work, start, end)
        rows.append({"stage": i, "layers": [start, end], "workers": ids, "memory_gb": round(m.total / 1e9, 2),
                     "breakdown_gb": {k: round(getattr(m, k) / 1e9, 3) for k in
                                      ("weights", "gradients", "optimizer", "autocast_copies", "activations",
                                       "transient")},
                     "describe": m.describe(),
                     "fits": all(m.total / 1e9 <= memory_of[w] * MEMORY_HEADROOM for w in ids) if ids else None})
    return {"model": run.model.source, "precision": work.precision,
            "activation_checkpointing": run.pipeline.activation_checkpointing, "in_flight": work.in_flight,
            "tokens_per_micro_batch": work.tokens_per_micro_batch, "planned": decision is not None,
            "predicted_step_s": decision.predicted_step_s if decision is not None else None,
            "stages": rows, "standby": dict(decision.standby) if decision is not None else {}}


def cmd_plan(args: argparse.Namespace) -> int:
    run = load_run_config(args.config)
    if args.model:
        run.model.source = args.model
    report = plan_report(run, parse_devices(args.devices))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["planned"] else 1
    print(f"{report['model']}: {report['precision']}, activation checkpointing "
          f"{report['activation_checkpointing']}, {report['in_flight']} micro-batch(es) of "
          f"{report['tokens_per_micro_batch']} tokens in flight per stage")
    for row in report["stages"]:
        who = ", ".join(row["workers"]) or "(no worker fits)"
        print(f"stage {row['stage']} layers {row['layers'][0]}-{row['layers'][1]}: {row['describe']} per replica "
              f"-> {who}")
    for worker, why in sorted(report["standby"].items()):
        print(f"standby {worker}: {why}")
    if not report["planned"]:
        print("no plan: these devices cannot hold every stage (more devices, more stages, or "
              "pipeline.activation_checkpointing = \"block\")")
        return 1
    print(f"predicted step: {report['predicted_step_s']:.2f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="the stage plan and each stage's memory for a run config and devices, "
                                    "before a run starts")
    p.add_argument("--config", required=True, help="run config TOML")
    p.add_argument("--devices", required=True,
                   help="NAME:TFLOPS:GB[xCOUNT],... e.g. 'a100:150:80x2,rtx3090:35:24x4'")
    p.add_argument("--model", help="the model whose shape to plan for, instead of the config's model.source "
                                   "(e.g. random:gptj-6b:0: GPT-J 6B's shape with no download)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)
