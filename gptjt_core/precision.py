"""Precision policy: fp32 master weights always; autocast decides what the matmuls run in."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a device computes: parameters and optimizer states stay fp32 (master weights);
    forward/backward run under autocast in `compute_dtype`; fp16 needs loss scaling
    (gptjt_core/loss_scale.py)."""

    name: str  # 'fp32', 'bf16' or 'fp16'
    device_type: str  # 'cpu' or 'cuda'

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def grad_scaler(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_every: int = 2000) -> torch.amp.GradScaler:
        """The local trainer's loss scaler (train.loss_scale_init, train.loss_scale_growth_every;
        enabled as gptjt_core.loss_scale.scaling_wanted says). Disabled scalers are pass-throughs,
        so callers need no branches."""
        return torch.amp.GradScaler(self.device_type, init_scale=init_scale, growth_interval=growth_every,
                                    enabled=enabled)


def resolve_precision(requested: str, device: torch.device | str) -> PrecisionPolicy:
    """'auto' -> bf16 on CUDA that supports it, else fp16 on CUDA; fp32 on CPU."""
    device_type = torch.device(device).type
    if requested == "auto":
        if device_type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    if requested not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {requested!r} is unknown; use auto, fp32, bf16 or fp16")
    if requested == "fp16" and device_type != "cuda":
        raise ConfigError("precision 'fp16' needs a CUDA device (CPU autocast has no fp16 "
                          "training path); use 'bf16' or 'fp32' on CPU")
    return PrecisionPolicy(requested, device_type)
