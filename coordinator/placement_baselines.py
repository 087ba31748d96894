"""Baseline placements, pure: what the placement search is measured against (bench scheduler)."""

from __future__ import annotations

import random

from .cost_model import StagePlacement, infeasible, predict_step
from .placement import Placement, chunks, split_layers, usable


def random_placement(devices, net, model, work, stages: int, rng: random.Random) -> Placement:
    """Baseline: a random partition into equal groups, a random order, layers split evenly."""
    ids, why = usable(devices, model, work)
    rng.shuffle(ids)
    return _even(chunks(ids, stages), devices, net, model, work, why)


def round_robin_placement(devices, net, model, work, stages: int) -> Placement:
    """Baseline: worker i -> stage i mod S in join order, layers split evenly."""
    ids, why = usable(devices, model, work)
    groups = [tuple(ids[i::stages]) for i in range(stages)]
    return _even(groups, devices, net, model, work, why)


def _even(groups, devices, net, model, work, why) -> Placement:
    """The groups with layers split evenly; where an even split does not fit some group's memory
    (the LM head's stage on a 24 GB card), the split that fits with the least slowest stage, so
    that a baseline is a plan that could run rather than an infinite step."""
    from gptjt_core.model import StageSpec

    specs = StageSpec.even_split(model.n_layer, len(groups))
    stages = [StagePlacement(s.start, s.end, g) for s, g in zip(specs, groups)]
    if infeasible(stages, devices, model, work):
        stages = split_layers(list(groups), devices, model, work) or stages
    problem = infeasible(stages, devices, model, work)
    cost = float("inf") if problem else predict_step(stages, devices, net, model, work).step_s
    return Placement(stages, cost, tuple(sorted(why)), why)
