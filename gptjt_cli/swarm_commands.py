"""Commands against a running swarm: export (the operator commands are in operator_commands)."""

from __future__ import annotations

import argparse

from .operator_client import call_status


def fetch_status(address: str, timeout: float = 10.0, tls_ca: str = "") -> dict:
    """The coordinator's status object (the same facts as the dashboard). Raises Unreachable
    (a RuntimeError) when the coordinator does not answer."""
    return call_status(address, tls_ca, timeout)


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
    from . import operator_commands

    operator_commands.register(sub)
