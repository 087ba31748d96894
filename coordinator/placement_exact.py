"""Exact placement for small swarms, pure: the plan of least predicted step time, proven so.

The space is every plan the cost model (coordinator/cost_model.py) accepts and
placement.plan() may return: S >= 1 pipeline stages over contiguous, non-empty layer ranges
covering the model, each with a non-empty replica group, the groups disjoint subsets of the
workers (a worker may be left on standby), every worker's stage within its memory; with
stage_counts and max_group limited as plan() limits them. plan(keep_workers=True), as the
coordinator calls it, searches a part of this space, so its plans are never below this
optimum either. The space grows like (S + 1) ^ workers, so this is for a handful of workers
(the bench's small instances, a swarm of a few machines), not for 64.

Method: depth-first branch and bound, stage by stage in pipeline order. A node fixes the first
stages (group and layer range); a child appends one more stage: any non-empty group of the
workers still free and any range [start, end) that fits the group's memory. A complete plan
(end = n_layer) is scored by cost_model.predict_step itself. Why nothing is missed:

  - Every plan is a leaf. Cut it after each stage: stage k's group and range are among the
    children of the node holding stages 0..k-1 (the children range over all free workers and
    all ends).
  - Symmetry: workers with the same (speed, memory, site, averaging rate) are interchangeable to the cost
    model (it reads nothing else of a device), so a group is chosen as a count per such class
    and takes that class's lowest-numbered free workers. Any plan is a relabelling of the one
    enumerated for its counts, with the same predicted step.
  - Pruning: a node is dropped only when a lower bound on every completion of it is above the
    best plan found. The predicted step is sum(compute) + 2 sum(transfer) + (M - 1) x the
    slowest compute or transfer + the slowest averaging, every term >= 0, so a completion
    costs at least the fixed stages' terms plus, for the layers still to place, their compute
    on ALL free workers together as one group (compute_left): the remaining stages' compute
    times p_i / r_i sum to at least sum p_i / sum r_i, and their maximum is at least that too
    (the largest of some ratios is at least the ratio of the sums), and the groups that take
    them use at most the free workers' rate. The head runs at its own rate (Device.head_rate):
    it counts as the head's parameters x the smallest block-over-head rate ratio of any free
    worker, which its group's ratio cannot be below; pricing it at all free workers' head rate
    instead would bound the sum but not the maximum. Pruning leaves a relative
    slack of PRUNE_SLACK so that float rounding between the bound's sums and predict_step's
    cannot cut off a plan that ties or beats the best.

So the result is the minimum of predict_step over the whole space, up to float rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .cost_model import (
    Device, ModelShape, Network, StagePlacement, Workload, allreduce_s, infeasible, predict_step, stage_compute_s,
    transfer_s,
)
from .placement_moves import kind

PRUNE_SLACK = 1e-9  # relative: far above float rounding (~1e-15), far below any gap reported


@dataclass
class ExactPlacement:
    """The optimal plan, its predicted step and how much of the tree the proof visited."""
    stages: list[StagePlacement]
    step_s: float
    nodes: int  # stages tried (group x range) across the search
    leaves: int  # complete plans scored by predict_step


def _classes(devices: list[Device], ids: list[int]) -> list[list[int]]:
    """`ids` grouped by what the cost model reads of a device (placement_moves.kind)."""
    by: dict[tuple, list[int]] = {}
    for i in ids:
        by.setdefault(kind(devices[i]), []).append(i)
    return [by[k] for k in sorted(by, key=lambda k: (k[2], -k[0], -k[1], -k[3]))]


def solve(devices: list[Device], net: Network, model: ModelShape, work: Workload,
          gone: frozenset[int] = frozenset(), stage_counts: list[int] | None = None, max_group: int = 0,
          incumbent: list[StagePlacement] | None = None) -> ExactPlacement:
    """The plan of least predicted step over every plan of the workers not in `gone` (see the
    module docstring), with a stage count in `stage_counts` (default: any) and at most
    `max_group` workers a group (0: any), as placement.plan() takes them. `incumbent`, a
    feasible plan such as placement.plan()'s, only speeds the proof up: its cost is the first
    bound to beat. Raises ValueError when no plan fits the workers' memory."""
    search = _BranchAndBound(devices, net, model, work, [i for i in range(len(devices)) if i not in gone],
                             set(stage_counts or range(1, model.n_layer + 1)), max_group)
    if incumbent is not None:
        if infeasible(incumbent, devices, model, work) or gone & {w for s in incumbent for w in s.workers}:
            raise ValueError("the incumbent must be a feasible plan of workers not gone")
        if len(incumbent) in search.counts and not (max_group and any(len(s.workers) > max_group for s in incumbent)):
            search.best_cost = predict_step(incumbent, devices, net, model, work).step_s
            search.best_stages = list(incumbent)
    search.descend([], [0] * len(search.classes), 0.0, 0.0, 0.0, 0.0)
    if search.best_stages is None:
        raise ValueError(f"no plan of {len(search.ids)} workers fits their memory"
                         + (f" with a stage count in {sorted(stage_counts)}" if stage_counts else ""))
    return ExactPlacement(search.best_stages, search.best_cost, search.nodes, search.leaves)


class _BranchAndBound:
    """The depth-first search of the module docstring, stage by stage in pipeline order."""

    def __init__(self, devices, net, model, work, ids: list[int], counts: set[int], max_group: int):
        self.devices, self.net, self.model, self.work = devices, net, model, work
        self.ids, self.counts, self.max_group = ids, counts, max_group
        self.classes = _classes(devices, ids)
        self.best_cost, self.best_stages = float("inf"), None
        self.nodes = self.leaves = 0

    def groups(self, used: list[int]):
        """(group, classes used after it, the workers still free after it): each non-empty group
        of the free workers, up to symmetry: a count per class, its lowest-numbered members."""
        free = [len(c) - u for c, u in zip(self.classes, used)]
        for take in itertools.product(*(range(f + 1) for f in free)):
            if not any(take) or (self.max_group and sum(take) > self.max_group):
                continue
            after = [u + k for u, k in zip(used, take)]
            group = tuple(sorted(w for c, u, a in zip(self.classes, used, after) for w in c[u:a]))
            yield group, after, tuple(w for c, a in zip(self.classes, after) for w in c[a:])

    def descend(self, stages: list[StagePlacement], used: list[int], compute: float, transfer: float,
                slowest: float, averaging: float) -> None:
        """Every child of the node `stages` (the sums and maxima of its terms so far) that its
        bound does not rule out."""
        model, work, devices, net = self.model, self.work, self.devices, self.net
        n, start = model.n_layer, stages[-1].end if stages else 0
        for group, after, rest in self.groups(used):
            for end in range(start + 1, n + 1):
                if end < n and (not rest or len(stages) + 1 >= max(self.counts)):
                    continue  # layers left over and no worker (or stage) to take them
                if end == n and len(stages) + 1 not in self.counts:
                    continue
                stage = StagePlacement(start, end, group)
                self.nodes += 1
                if infeasible([stage], devices, model, work):
                    continue
                c = stage_compute_s(model, work, stage, devices)
                t = transfer_s(model, work, stages[-1], stage, devices, net) if stages else 0.0
                sums = compute + c, transfer + t, max(slowest, c, t), max(averaging, allreduce_s(
                    model, work, stage, devices, net))
                if end == n:
                    self.leaf([*stages, stage], self.bound(*sums, 0.0))
                elif self.bound(*sums, compute_left(model, work, end, rest, devices)) \
                        <= self.best_cost * (1 + PRUNE_SLACK):
                    self.descend([*stages, stage], after, *sums)

    def bound(self, compute: float, transfer: float, slowest: float, averaging: float, left: float) -> float:
        """The least predicted step of any completion: `left` is the compute of the layers still
        to place on every free worker at once (0 at a leaf, where the bound is the step)."""
        m = self.work.micro_batches
        return compute + left + 2 * transfer + (m - 1) * max(slowest, left) + averaging

    def leaf(self, plan: list[StagePlacement], bound: float) -> None:
        cost = predict_step(plan, self.devices, self.net, self.model, self.work).step_s
        self.leaves += 1
        # the bound is the step at a leaf: were it above predict_step's, pruning could be wrong
        assert bound <= cost * (1 + PRUNE_SLACK), (bound, cost, plan)
        if cost < self.best_cost:
            self.best_cost, self.best_stages = cost, plan


def compute_left(model: ModelShape, work: Workload, start: int, workers: tuple[int, ...],
                 devices: list[Device]) -> float:
    """A lower bound on both the sum and the largest of the compute times of any stages that
    split layers [start, n_layer) and the head among groups of `workers` (the module docstring)."""
    rate = sum(devices[w].tflops for w in workers)
    head_ratio = min(devices[w].tflops / devices[w].head_rate for w in workers)
    params = (model.n_layer - start) * model.layer_params + model.head_params * head_ratio
    return 6 * params * work.tokens_per_micro_batch / (rate * 1e12)
