"""Placement search, pure: stages, their replica groups and layer ranges that minimise the
cost model's predicted step time (coordinator/cost_model.py). No I/O.

  1. For each stage count S that memory allows, devices are ordered site by site along a
     greedy chain (start at the biggest site, then always the best-connected unvisited
     one) and cut into S consecutive groups: replica groups stay inside sites (their
     all-reduce is the heavy traffic) and neighbouring stages sit on good links.
  2. Layers are split between the ordered groups by dynamic programming: contiguous
     ranges, each within its group's smallest memory, minimising the slowest stage.
  3. Local search: swap two workers between groups and reverse runs of the stage order
     (2-opt), re-splitting layers, keeping any change that lowers the predicted step;
     until no change helps or the time budget runs out.
Re-planning (`replan`) starts from the current placement and moves workers only when the
predicted gain over `horizon_steps` outweighs the time to load the layers that move.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .cost_model import (
    Device, ModelShape, Network, StagePlacement, Workload, infeasible, memory_needed_gb, predict_step,
)
from .cost_model import MEMORY_HEADROOM as HEADROOM


REFINED_COUNTS = 3  # stage counts the local search refines, best initial cost first


@dataclass
class Placement:
    stages: list[StagePlacement]
    step_s: float
    standby: tuple[int, ...] = ()  # workers given no stage (too small, or left over)
    why_standby: dict[int, str] | None = None


def split_layers(groups: list[tuple[int, ...]], devices: list[Device], model: ModelShape,
                 work: Workload) -> list[StagePlacement] | None:
    """Contiguous layer ranges for groups in pipeline order, minimising the slowest stage's
    compute (memory-feasible), or None when no split fits."""
    n, s = model.n_layer, len(groups)
    rate = [sum(devices[w].tflops for w in g) for g in groups]
    memory = [min(devices[w].memory_gb for w in g) * HEADROOM for g in groups]
    inf = float("inf")
    # best[i][l]: the least "slowest stage" covering layers [0, l) with stages 0..i-1
    best = [[inf] * (n + 1) for _ in range(s + 1)]
    cut = [[0] * (n + 1) for _ in range(s + 1)]
    best[0][0] = 0.0
    for i in range(1, s + 1):
        for end in range(i, n - (s - i) + 1):
            for start in range(i - 1, end):
                if best[i - 1][start] == inf or memory_needed_gb(model, work, start, end) > memory[i - 1]:
                    continue
                params = (end - start) * model.layer_params + (model.head_params if end == n else 0)
                t = max(best[i - 1][start], params / rate[i - 1])
                if t < best[i][end]:
                    best[i][end], cut[i][end] = t, start
    if best[s][n] == inf:
        return None
    bounds, end = [], n
    for i in range(s, 0, -1):
        bounds.append((cut[i][end], end))
        end = cut[i][end]
    bounds.reverse()
    return [StagePlacement(a, b, g) for (a, b), g in zip(bounds, groups)]


def _site_chain(devices: list[Device], ids: list[int], net: Network) -> list[int]:
    """`ids` ordered site by site: biggest site first, then the best-linked unvisited site."""
    by_site: dict[str, list[int]] = {}
    for i in ids:
        by_site.setdefault(devices[i].site, []).append(i)
    for members in by_site.values():
        members.sort(key=lambda i: -devices[i].tflops)
    sites = sorted(by_site, key=lambda s: (-len(by_site[s]), s))
    order, current = [sites.pop(0)], None
    while sites:
        current = order[-1]
        probe = devices[by_site[current][0]]
        nxt = max(sites, key=lambda s: (net.link(probe, devices[by_site[s][0]]).gbps,
                                         -net.link(probe, devices[by_site[s][0]]).latency_s, s))
        sites.remove(nxt)
        order.append(nxt)
    return [i for s in order for i in by_site[s]]


def _chunks(ids: list[int], s: int, small_first: bool = False) -> list[tuple[int, ...]]:
    """`ids` cut into s contiguous groups whose sizes differ by at most one (the larger
    groups first, or last with small_first)."""
    r, extra = divmod(len(ids), s)
    out, at = [], 0
    for i in range(s):
        size = r + (1 if (i >= s - extra if small_first else i < extra) else 0)
        out.append(tuple(ids[at:at + size]))
        at += size
    return out


def evaluate(groups: list[tuple[int, ...]], devices, net, model, work,
             polish: bool = False) -> tuple[float, list[StagePlacement] | None]:
    """Predicted step of `groups` (in pipeline order) with the best layer split found. The DP
    split balances compute; polish=True then moves single stage boundaries while the full
    predicted step (transfers, averaging) improves."""
    stages = split_layers(groups, devices, model, work)
    if stages is None:
        return float("inf"), None
    cost = predict_step(stages, devices, net, model, work).step_s
    while polish:
        polish = False
        for i in range(len(stages) - 1):
            for delta in (-1, 1):
                cut = stages[i].end + delta
                if not stages[i].start < cut < stages[i + 1].end:
                    continue
                cand = list(stages)
                cand[i] = StagePlacement(stages[i].start, cut, stages[i].workers)
                cand[i + 1] = StagePlacement(cut, stages[i + 1].end, stages[i + 1].workers)
                if infeasible(cand, devices, model, work):
                    continue
                c = predict_step(cand, devices, net, model, work).step_s
                if c < cost - 1e-12:
                    stages, cost, polish = cand, c, True
    return cost, stages


def _local_search(groups, devices, net, model, work, deadline: float, rng: random.Random):
    cost, stages = evaluate(groups, devices, net, model, work)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        # 2-opt on the stage order
        for i in range(len(groups) - 1):
            for j in range(i + 1, len(groups)):
                cand = groups[:i] + groups[i:j + 1][::-1] + groups[j + 1:]
                c, st = evaluate(cand, devices, net, model, work)
                if c < cost - 1e-9:
                    groups, cost, stages, improved = cand, c, st, True
        # worker swaps between groups, in random order
        pairs = [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))]
        rng.shuffle(pairs)
        for a, b in pairs:
            if time.perf_counter() > deadline:
                break
            for x in range(len(groups[a])):
                for y in range(len(groups[b])):
                    ga, gb = list(groups[a]), list(groups[b])
                    da, db = devices[ga[x]], devices[gb[y]]
                    if (da.tflops, da.memory_gb, da.site) == (db.tflops, db.memory_gb, db.site):
                        continue  # swapping equals changes nothing
                    ga[x], gb[y] = gb[y], ga[x]
                    cand = list(groups)
                    cand[a], cand[b] = tuple(ga), tuple(gb)
                    c, st = evaluate(cand, devices, net, model, work)
                    if c < cost - 1e-9:
                        groups, cost, stages, improved = cand, c, st, True
                        break
                else:
                    continue
                break
    return groups, cost, stages


def usable(devices: list[Device], model: ModelShape, work: Workload,
           gone: frozenset[int] = frozenset()) -> tuple[list[int], dict[int, str]]:
    """Workers (not in `gone`) that can hold at least one layer, and why the others cannot."""
    one_layer = min(memory_needed_gb(model, work, s, s + 1) for s in range(1, model.n_layer - 1)) \
        if model.n_layer > 2 else memory_needed_gb(model, work, 0, 1)
    ok, why = [], {}
    for i, d in enumerate(devices):
        if i in gone:
            continue
        if d.memory_gb * HEADROOM < one_layer:
            why[i] = (f"{d.name} has {d.memory_gb:g} GB; one layer of this model needs {one_layer:.1f} GB "
                      f"(weights + optimizer state + activations): it waits on standby")
        else:
            ok.append(i)
    return ok, why


def plan(devices: list[Device], net: Network, model: ModelShape, work: Workload,
         stage_counts: list[int] | None = None, budget_s: float = 0.5, seed: int = 0,
         gone: frozenset[int] = frozenset()) -> Placement:
    """The best placement found within `budget_s` (see the module docstring); workers in
    `gone` have left."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    ids, why = usable(devices, model, work, gone)
    if not ids:
        raise ValueError("no worker can hold even one layer: " + "; ".join(why.values()))
    counts = stage_counts or list(range(1, min(len(ids), model.n_layer) + 1))
    chain = _site_chain(devices, ids, net)
    starts = []
    for s in counts:
        # A small device can make every split infeasible for its group: leave the smallest
        # out until the groups fit (they wait on standby).
        members = list(chain)
        while len(members) >= s:
            # Groups of unequal size: try the smaller ones first and last in the pipeline (the
            # first stage is lighter: its embedding costs memory, not FLOPs).
            cost, groups = min(((evaluate(g, devices, net, model, work)[0], g)
                                for g in (_chunks(members, s), _chunks(members, s, small_first=True))),
                               key=lambda x: x[0])
            if cost < float("inf"):
                starts.append((cost, groups))
                break
            members.remove(min(members, key=lambda i: (devices[i].memory_gb, devices[i].tflops)))
    if not starts:
        raise ValueError(f"no stage count in {counts} fits the workers' memory")
    starts.sort(key=lambda x: x[0])
    best_cost, best_groups, best_stages = float("inf"), None, None
    for k, (_, groups) in enumerate(starts[:REFINED_COUNTS]):  # refine the most promising stage counts
        remaining = budget_s - (time.perf_counter() - t0)
        deadline = time.perf_counter() + remaining / (min(REFINED_COUNTS, len(starts)) - k)
        g, c, st = _local_search(groups, devices, net, model, work, deadline, rng)
        if c < best_cost:
            best_cost, best_groups, best_stages = c, g, st
    best_cost, best_stages = evaluate(best_groups, devices, net, model, work, polish=True)
    assert best_stages is not None and not infeasible(best_stages, devices, model, work)
    placed = {w for st in best_stages for w in st.workers}
    for w in ids:
        if w not in placed:
            why[w] = f"{devices[w].name}: the plan is faster or only fits without it; it waits on standby"
    return Placement(best_stages, best_cost, tuple(sorted(why)), why)


def random_placement(devices, net, model, work, stages: int, rng: random.Random) -> Placement:
    """Baseline: a random partition into equal groups, a random order, layers split evenly."""
    ids, why = usable(devices, model, work)
    rng.shuffle(ids)
    return _even(_chunks(ids, stages), devices, net, model, work, why)


def round_robin_placement(devices, net, model, work, stages: int) -> Placement:
    """Baseline: worker i -> stage i mod S in join order, layers split evenly."""
    ids, why = usable(devices, model, work)
    groups = [tuple(ids[i::stages]) for i in range(stages)]
    return _even(groups, devices, net, model, work, why)


def _even(groups, devices, net, model, work, why) -> Placement:
    from gptjt_core.model import StageSpec

    specs = StageSpec.even_split(model.n_layer, len(groups))
    stages = [StagePlacement(s.start, s.end, g) for s, g in zip(specs, groups)]
    problem = infeasible(stages, devices, model, work)
    cost = float("inf") if problem else predict_step(stages, devices, net, model, work).step_s
    return Placement(stages, cost, tuple(sorted(why)), why)


def layers_moved(before: list[StagePlacement], after: list[StagePlacement]) -> int:
    """Layers workers must load to go from `before` to `after` (a new worker loads its stage)."""
    held = {w: set(range(s.start, s.end)) for s in before for w in s.workers}
    return sum(len(set(range(s.start, s.end)) - held.get(w, set())) for s in after for w in s.workers)


def replan(current: list[StagePlacement], devices: list[Device], net: Network, model: ModelShape,
           work: Workload, seconds_per_layer_load: float, horizon_steps: int, budget_s: float = 0.5,
           seed: int = 0, gone: frozenset[int] = frozenset(), stage_counts: list[int] | None = None,
           max_group: int = 0) -> Placement:
    """After a join, a leave or a new measurement: keep the current groups (minus workers that
    are gone, plus newcomers where they help most) unless a fresh search predicts a gain over
    `horizon_steps` steps that is worth the layers it would move. stage_counts bounds the
    fresh search as in plan(); max_group (0: none) caps a replica group's size."""
    alive = set(usable(devices, model, work, gone)[0])
    groups = [tuple(w for w in s.workers if w in alive) for s in current]
    groups = [g for g in groups if g]
    placed = {w for g in groups for w in g}
    for w in sorted(alive - placed):  # newcomers: join the group where the step is fastest
        options = []
        for i in range(len(groups)):
            if max_group and len(groups[i]) >= max_group:
                continue
            cand = list(groups)
            cand[i] = cand[i] + (w,)
            options.append((evaluate(cand, devices, net, model, work)[0], i))
        if options:  # else every group is full: the newcomer waits (or the fresh plan takes it)
            cost, i = min(options)
            groups[i] = groups[i] + (w,)
    fresh = plan(devices, net, model, work, stage_counts=stage_counts, budget_s=budget_s, seed=seed, gone=gone)
    options = [(fresh.step_s, fresh.stages)]
    if groups and not (stage_counts and len(groups) not in stage_counts):
        options.append(evaluate(groups, devices, net, model, work))  # the same groups, layers re-split
        if len(groups) == len(current):  # the same groups on the same ranges: nothing reloads
            same = [StagePlacement(s.start, s.end, g) for s, g in zip(current, groups)]
            if not infeasible(same, devices, model, work):
                options.append((predict_step(same, devices, net, model, work).step_s, same))
    # Each option costs its steps over the horizon plus the layers its moves load.
    total = lambda o: o[0] * horizon_steps + layers_moved(current, o[1]) * seconds_per_layer_load  # noqa: E731
    cost, stages = min((o for o in options if o[1] is not None), key=total)
    if stages is fresh.stages:
        return fresh
    return Placement(stages, cost)
