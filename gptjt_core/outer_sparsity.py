"""Random-k sparsification of the outer step's pseudo-gradient, with error feedback. Pure torch.

In averaging.mode "local-steps" the replicas of a stage average their pseudo-gradients (anchor -
parameters) every outer_every steps. With averaging.outer_density d < 1 each replica sends only
k = ceil(d x numel) coordinates of each parameter's pseudo-gradient: every replica of the stage
picks the same ones (a generator seeded by the run's name, the stage's layers, the step and the
tensor's place), so no index crosses the wire and the all-reduce is of dense length-k vectors
(CocktailSGD's random sparsification, Wang et al. 2023).

Error feedback: what a replica did not send is kept in its residual and added to its next outer
step's pseudo-gradient, so a coordinate's local progress is delayed, never dropped: after every
outer step, sent + residual equals the sum of the pseudo-gradients the replica computed. The
replica's parameters are reset to the anchor as in dense DiLoCo; its unsent progress lives on
only in the residual.

Why only here: error feedback needs one quantity compressed again and again whose running sum is
what counts. The pseudo-gradient is that (the anchor moves by the sum of the outer updates).
Activations and per-micro-batch activation gradients on the stage links are each used once, by
one micro-batch's computation: a residual carried into the next micro-batch's tensor would add
one sequence's rounding error to another sequence's values, which corrects nothing.

The residual is per replica and not in the stage checkpoint (replicas differ in it, the
checkpoint holds the state they share): a replica that restarts loses at most its unsent part
of one outer step's progress.
"""

from __future__ import annotations

import hashlib
import math

import torch


def kept(numel: int, density: float) -> int:
    """Coordinates of a tensor of `numel` values averaged at density `density` (at least one)."""
    return max(1, min(numel, math.ceil(density * numel)))


class OuterSparsifier:
    """Chooses each outer step's coordinates and keeps this replica's residual."""

    def __init__(self, density: float, key: str, shapes: list[torch.Size]):
        """density: in (0, 1]; key: the same for every replica of one stage (run name and layers);
        shapes: the stage's parameters, in parameter order."""
        if not 0 < density <= 1:
            raise ValueError(f"outer density {density!r} must be in (0, 1]")
        self.density, self.key, self.shapes = density, key, list(shapes)
        self.residual: list[torch.Tensor] | None = None  # fp32, parameter shapes; None: nothing kept yet
        self._cached: tuple[int, list[torch.Tensor]] | None = None  # (step, its indices): select, then expand

    def averaged_shapes(self) -> list[torch.Size]:
        """What the averager sums: one length-k vector per parameter."""
        return [torch.Size([kept(math.prod(s), self.density)]) for s in self.shapes]

    def indices(self, step: int) -> list[torch.Tensor]:
        """The flat coordinates each parameter sends at the outer step of `step` (sorted)."""
        if self._cached is not None and self._cached[0] == step:
            return self._cached[1]
        out = []
        for i, shape in enumerate(self.shapes):
            numel = math.prod(shape)
            seed = int.from_bytes(hashlib.sha256(f"{self.key}:{step}:{i}".encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            out.append(torch.randperm(numel, generator=g)[:kept(numel, self.density)].sort().values)
        self._cached = (step, out)
        return out

    def select(self, deltas: list[torch.Tensor], step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(values to average, the residual after sending them) for this replica's pseudo-gradients
        `deltas` (parameter shapes). The residual is staged, not kept: commit() it once the outer
        step is applied, so a failed or restarted round loses nothing."""
        if [d.shape for d in deltas] != self.shapes:
            raise ValueError(f"pseudo-gradient shapes {[tuple(d.shape) for d in deltas][:3]}... are not the "
                             f"stage's {[tuple(s) for s in self.shapes][:3]}...")
        values, residual = [], []
        for i, (d, idx) in enumerate(zip(deltas, self.indices(step))):
            full = d.detach().float().reshape(-1).clone()
            if self.residual is not None:
                full += self.residual[i].to(full.device).reshape(-1)
            idx = idx.to(full.device)
            values.append(full[idx].clone())
            full[idx] = 0.0
            residual.append(full.reshape(d.shape))
        return values, residual

    def expand(self, values: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The averaged `values` as dense tensors of the parameters' shapes (zero elsewhere)."""
        out = []
        for v, idx, shape in zip(values, self.indices(step), self.shapes):
            dense = torch.zeros(math.prod(shape), dtype=torch.float32, device=v.device)
            dense[idx.to(v.device)] = v.float()
            out.append(dense.reshape(shape))
        return out

    def commit(self, residual: list[torch.Tensor]) -> None:
        self.residual = residual
