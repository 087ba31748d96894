"""Operator commands against a running coordinator: status, workers, stages, tickets, token, export."""

from __future__ import annotations

import argparse
import json

import grpc

from gptjt_proto import coordinator_pb2 as pb
from gptjt_proto import coordinator_pb2_grpc as pb_grpc


def open_channel(address: str, tls_ca: str = "") -> grpc.Channel:
    if tls_ca:
        with open(tls_ca, "rb") as f:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()))
    return grpc.insecure_channel(address)


def fetch_status(address: str, timeout: float = 10.0, tls_ca: str = "") -> dict:
    """The coordinator's status object (the same facts as the dashboard)."""
    with open_channel(address, tls_ca) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise RuntimeError(f"coordinator {address} did not answer ({e.code().name}): is it running?") from None
    return json.loads(reply.json)


def _table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _workers_table(s: dict) -> str:
    return _table([[w["id"], w["name"], w["stage"] if w["stage"] >= 0 else "-", w["state"],
                    f"{w['last_heartbeat_s']:.1f}s", f"{w['metrics'].get('micro_batches_per_s', 0):.2f}",
                    f"{100 * w['metrics'].get('busy_fraction', 0):.0f}%", w["tickets_done"], w["address"]]
                   for w in s["workers"]],
                  ["worker", "name", "stage", "state", "heartbeat", "mb/s", "busy", "tickets", "address"])


def _stages_table(s: dict) -> str:
    devices = {w["id"]: w["device"] for w in s["workers"]}
    table = _table([[st["index"], f"layers {st['start_layer']}-{st['end_layer']}",
                     ("embed " if st["embed"] else "") + ("head" if st["head"] else ""),
                     ",".join(st["workers"]) or "(vacant)",
                     " + ".join(f"{devices.get(w, {}).get('matmul_tflops', 0):.3g}" for w in st["workers"]) or "-"]
                    for st in s["stages"]],
                   ["stage", "layers", "holds", "workers", "TFLOP/s"])
    return table + "\n" + _plan_summary(s.get("plan") or {})


def _plan_summary(plan: dict) -> str:
    """The scheduler's view: predicted vs measured step time, the last re-plan, standby reasons."""
    fmt = lambda v: f"{v:.3g} s" if v is not None else "n/a"  # noqa: E731
    lines = [f"placement: {plan.get('placement', '?')}; predicted step {fmt(plan.get('predicted_step_s'))}, "
             f"measured {fmt(plan.get('measured_step_s'))} (median of the last 5 steps)"]
    last = plan.get("last_replan")
    if last:
        lines.append(f"last re-plan at step {last['step']}: {last['why']} ({last['layers_moved']} layer(s) moved; "
                     f"{plan.get('layers_moved_total', 0)} in all)")
    if plan.get("pending"):
        lines.append(f"pending re-plan (applies at the next complete checkpoint): {plan['pending']}")
    for worker, why in sorted((plan.get("standby_why") or {}).items()):
        lines.append(f"standby {worker}: {why}")
    return "\n".join(lines)


def _tickets_table(s: dict) -> str:
    t = s["tickets"]
    return _table([[t["issued"], t["committed"], t["reissued"], t["leased"], t["pending"]]],
                  ["issued", "committed", "reissued", "leased", "pending"])


def _summary(s: dict) -> str:
    loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
    latest = s["checkpoints"]["latest_complete"]
    return (f"run {s['run']}: step {s['step']}/{s['steps_total']} ({s['phase']}"
            f"{', paused' if s['paused'] else ''}), loss {loss}, {s['tokens']:,} tokens, "
            f"{s['tokens_per_s']:,.0f} tokens/s, last full checkpoint: "
            f"{'step ' + str(latest) if latest is not None else 'none'}")


def cmd_status(args: argparse.Namespace) -> int:
    s = fetch_status(args.coordinator, tls_ca=args.tls_ca)
    view = args.view
    if args.json:
        if view == "status":
            print(json.dumps(s))
        else:
            print(json.dumps({view: s[view]}))
        return 0
    if view == "status":
        print(_summary(s))
        print()
        print(_stages_table(s))
        print()
        print(_workers_table(s))
        print()
        print(_tickets_table(s))
    else:
        print({"workers": _workers_table, "stages": _stages_table, "tickets": _tickets_table}[view](s))
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from coordinator.state import create_token_in
    from gptjt_core.config import load_run_config, tiny_demo_config

    path = args.state
    if not path:
        run = load_run_config(args.config) if args.config else tiny_demo_config()
        path = run.coordinator.state_path
    print(create_token_in(path))
    return 0


async def _fetch_all_stages(status: dict) -> list[dict]:
    from safetensors.torch import load

    from gptjt_core.stage_checkpoint import split_state
    from worker.transport import LinkCounters, StageClient

    client = StageClient(LinkCounters(), 1 << 20)
    by_id = {w["id"]: w for w in status["workers"]}
    try:
        states = []
        positions = set()
        for stage in status["stages"]:
            # a member replica holds the run's state; a joiner may still be copying it
            holders = stage.get("members") or stage["workers"]
            if not holders:
                raise RuntimeError(f"stage {stage['index']} has no live worker; cannot export it")
            header, blob = await client.fetch_state(by_id[holders[0]]["address"])
            positions.add(header.position)
            states.append(split_state(load(blob))[0])  # weights only
        if len(positions) > 1:
            raise RuntimeError(f"the stages hold different steps {sorted(positions)} (a step was being applied); "
                               "export again")
        return states
        return states
    finally:
        await client.close()


def export_from_swarm(address: str, out: str, dtype: str = "fp32") -> str:
    """Gather every stage's weights from its worker and write a HF checkpoint."""
    import asyncio

    import torch

    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import model_config_for
    from gptjt_core.tokenizer import load_tokenizer

    status = fetch_status(address)
    states = asyncio.run(_fetch_all_stages(status))
    run_source = status["model_source"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    path = export_checkpoint(states, model_config_for(run_source), out,
                             tokenizer=load_tokenizer(status["tokenizer"]), dtype=dtypes[dtype])
    return str(path)


def export_from_store(store_root: str, out: str, step: int | None = None, source: str = "random:tiny:0",
                      tokenizer: str = "gpt2-offline", dtype: str = "fp32") -> str:
    """A HF checkpoint from the checkpoint store (the newest complete step unless `step` is given)."""
    import torch

    from coordinator.checkpoint_store import CheckpointStore
    from gptjt_core.export import export_checkpoint
    from gptjt_core.model import StageSpec, model_config_for
    from gptjt_core.stage_checkpoint import split_state
    from gptjt_core.tokenizer import load_tokenizer

    config = model_config_for(source)
    store = CheckpointStore(store_root)
    if step is None:
        step = store.latest_complete(config.n_layer)
        if step is None:
            raise FileNotFoundError(f"the store {store_root} holds no complete checkpoint (steps: {store.steps()})")
    whole = StageSpec(0, config.n_layer, embed=True, head=True)
    weights, _ = split_state(store.get(step, whole, config.n_layer))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return str(export_checkpoint([weights], config, out, tokenizer=load_tokenizer(tokenizer), dtype=dtypes[dtype]))


def register(sub: argparse._SubParsersAction) -> None:
    for view, help_text in [("status", "run overview: step, loss, tokens/s, stages, workers, tickets"),
                            ("workers", "the workers table"), ("stages", "the stage plan"),
                            ("tickets", "the ticket ledger counters")]:
        p = sub.add_parser(view, help=help_text)
        p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--tls-ca", default="", help="PEM root certificate of a TLS coordinator")
        p.set_defaults(func=cmd_status, view=view)

    p = sub.add_parser("token", help="join tokens for a run")
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="create a join token and print it (stored hashed in the ledger)")
    c.add_argument("--config", help="run config TOML (its coordinator.state_path is the ledger)")
    c.add_argument("--state", help="the ledger file directly")
    c.set_defaults(func=cmd_token_create)

