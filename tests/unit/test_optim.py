"""The optimizer build_optimizer gives: torch's fused AdamW on the CPU, the same update as its loop."""

from __future__ import annotations

import copy

import torch

from gptjt_core.config import OptimConfig
from gptjt_core.optim import build_optimizer, load_optimizer_state

CFG = OptimConfig(lr=1e-3, weight_decay=0.1)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 33, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_cpu_parameters_get_the_fused_kernel_with_the_loops_update():
    fused_params, loop_params = _params(0), _params(0)
    fused = build_optimizer(fused_params, CFG)
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW(loop_params, lr=CFG.lr, betas=tuple(CFG.betas), eps=CFG.eps,
                             weight_decay=CFG.weight_decay, foreach=False)
    _steps(fused, fused_params, 5, seed=1)
    _steps(loop, loop_params, 5, seed=1)
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_state_saved_by_the_loop_loads_into_the_fused_kernel_and_goes_on_alike():
    """A checkpoint written before fused kernels (its groups say fused=None) keeps this
    device's kernel when loaded, and the run continues as if it had not been interrupted."""
    old_params = _params(2)
    old = torch.optim.AdamW(old_params, lr=CFG.lr, betas=tuple(CFG.betas), eps=CFG.eps,
                            weight_decay=CFG.weight_decay)
    _steps(old, old_params, 3, seed=3)
    saved = copy.deepcopy(old.state_dict())  # as from a file: the loaded state shares no tensor with `old`
    assert saved["param_groups"][0]["fused"] is None
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in old_params]
    resumed = build_optimizer(resumed_params, CFG)
    load_optimizer_state(resumed, saved)
    assert all(group["fused"] for group in resumed.param_groups)
    _steps(resumed, resumed_params, 2, seed=4)
    _steps(old, old_params, 2, seed=4)
    for a, b in zip(resumed_params, old_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
