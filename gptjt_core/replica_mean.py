"""The mean of one stage's replicas' weights, for an export of a swarm's model.

In "local-steps" mode (DiLoCo-style) a stage's replicas step apart between outer steps: the model
the run stands for is their average, not any one replica's drifted weights (DiLoCo keeps and
evaluates the outer model). An outer step with plain averaging (outer_lr 1, no momentum, density
1) makes exactly this mean; with an outer learning rate or momentum it would move further along
it, which an export does not guess at. In "every-step" mode the replicas are identical and the
mean is each of them, bit for bit (below).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ReplicaMean:
    """Accumulates replicas' state dicts one at a time; `mean()` returns their mean in each
    tensor's own dtype. Sums are float64: a float32 (or narrower) value times n < 2**29 is exact
    there, so the mean of identical replicas is that replica exactly, and memory stays at the sums
    plus the replica being added however many replicas there are (a stage of one replica keeps its
    tensors as they are, without float64 copies). Every replica must have the first
    one's tensor names, shapes and dtypes, and only finite values: a replica that does not is
    refused by name, and nothing of it is added."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # the first replica's own tensors until a second comes
        self.dtypes: dict[str, torch.dtype] = {}
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Add one replica's weights; `source` names it in errors (a worker id)."""
        self._check(state, source)
        for name, tensor in state.items():
            if self.count == 0:
                self.sums[name] = tensor.detach()
                self.dtypes[name] = tensor.dtype
            elif self.count == 1:
                self.sums[name] = self.sums[name].to(torch.float64) + tensor.detach().to(torch.float64)
            else:
                self.sums[name].add_(tensor.detach().to(torch.float64))
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no replica was added; there is nothing to average")
        if self.count == 1:
            return dict(self.sums)
        return {name: (total / self.count).to(self.dtypes[name]) for name, total in self.sums.items()}

    def _check(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        if self.count and set(state) != set(self.sums):
            odd = sorted(set(state) ^ set(self.sums))
            raise ValueError(f"replica {source} holds other tensors than the stage's first replica "
                             f"({odd[:4]}{'...' if len(odd) > 4 else ''}); is it on another stage or plan?")
        for name, tensor in state.items():
            if self.count and (tensor.shape != self.sums[name].shape or tensor.dtype != self.dtypes[name]):
                raise ValueError(f"replica {source}'s {name} is {tensor.dtype} {tuple(tensor.shape)}, the stage's "
                                 f"first replica's {self.dtypes[name]} {tuple(self.sums[name].shape)}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"replica {source}'s {name} holds NaN or infinite values; export from another "
                                 "replica or from the store (`gptjt export --store`)")
