"""Stage checkpoints: weights + optimizer state keyed by parameter name, so any layer range can
be re-sliced out of them (the store that holds them lives with the coordinator)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .model import StageSpec

OPTIM = "optimizer/"  # optimizer tensors are stored as optimizer/<param name>/<state key>
OUTER = "outer/"  # local-steps averaging state: outer/<kind>/<param name>, kind "anchor" or "momentum"


def stage_state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        outer: dict[str, list[torch.Tensor] | None] | None = None) -> dict[str, torch.Tensor]:
    """Weights under their HF names plus every optimizer state tensor under optimizer/<name>/<key>,
    and the outer (local-steps) state under outer/<kind>/<name>: {kind: tensors in parameter order}."""
    out = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{OPTIM}{name}/{key}"] = t.detach().cpu().contiguous()
    names = [name for name, _ in model.named_parameters()]
    for kind, tensors in (outer or {}).items():
        for name, t in zip(names, tensors or []):
            out[f"{OUTER}{kind}/{name}"] = t.detach().cpu().contiguous()
    return out


def outer_state(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{kind: {param name: tensor}} of the outer (local-steps) state in a stage state."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith(OUTER):
            kind, param = name[len(OUTER):].split("/", 1)
            out.setdefault(kind, {})[param] = t
    return out


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(weights, {param name: {state key: tensor}})."""
    weights, optim = {}, {}
    for name, t in tensors.items():
        if name.startswith(OPTIM):
            param, key = name[len(OPTIM):].rsplit("/", 1)
            optim.setdefault(param, {})[key] = t
        elif name.startswith(OUTER):
            continue  # see outer_state
        else:
            weights[name] = t
    return weights, optim


def restore_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                      optim: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put saved state back on the parameters of `model` (same names, any stage layout)."""
    for name, p in model.named_parameters():
        if name in optim:
            optimizer.state[p] = {k: v.to(p.device) if v.dim() else v.clone() for k, v in optim[name].items()}


def wanted_names(names: Iterable[str], spec: StageSpec, n_layer: int) -> list[str]:
    """The stored tensors (weights and optimizer entries) that stage `spec` needs."""
    params = set(spec.tensor_names(n_layer))
    out = []
    for name in names:
        if name.startswith(OPTIM):
            base = name[len(OPTIM):].rsplit("/", 1)[0]
        elif name.startswith(OUTER):
            base = name[len(OUTER):].split("/", 1)[1]
        else:
            base = name
        if base in params:
            out.append(name)
    return out
