"""Placement search, pure: stages, their replica groups and layer ranges that minimise the
cost model's predicted step time (coordinator/cost_model.py). No I/O.

  1. For each stage count S that memory allows, devices are ordered site by site along a
     greedy chain (start at the biggest site, then always the best-connected unvisited
     one) and cut into S consecutive groups: replica groups stay inside sites (their
     all-reduce is the heavy traffic) and neighbouring stages sit on good links.
  2. Layers are split between the ordered groups by dynamic programming: contiguous
     ranges, each within its group's smallest memory, minimising the slowest stage.
  3. Local search: swap two workers between groups and reverse runs of the stage order
     (2-opt), re-splitting layers, keeping any change that lowers the predicted step; once
     those settle, move one worker (to another group, a stage of its own, or standby; from
     standby into a group) or merge two neighbouring groups, so group sizes, the stage count
     and who takes part change too (on slow links a plan can be faster without a worker);
     until no change helps or the search has scored `evaluations` candidates (shared by
     the REFINED_COUNTS most promising stage counts; what one leaves, the next may use).
  4. What they leave (small swarms settle early) goes to descents that score candidates
     with polished layer boundaries, from the best groups so far and then from more starts:
     the other stage counts and each site's workers alone. A final polish moves single layer
     boundaries of the best plan while the full prediction improves.
coordinator/placement_exact.py proves the optimum on small swarms; `bench scheduler` reports
how far this search stays from it (gap_vs_optimal).
The count, not the clock, ends the search, so the same inputs give the same plan however
loaded the machine is; any randomness comes from `seed`. A wall-clock backstop
(`backstop_s`, search_budget.py) stops every loop (first layouts, 2-opt, swaps, moves,
polish) on pathological inputs only; it should never bind at the defaults.
Re-planning (`replan`) starts from the current placement and moves workers only when the
predicted gain over `horizon_steps` outweighs the stall of what moves (move_cost_s: workers
load in parallel, the most layers one worker loads, plus a measured reload of every stage when
a holder's range changes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .cost_model import (
    Device, ModelShape, Network, StagePlacement, Workload, infeasible, memory_needed_gb, predict_step,
)
from .cost_model import MEMORY_HEADROOM as HEADROOM
from .layer_split import split_layers
from .placement_moves import pairs, resizes, swaps
from .search_budget import SearchBudget


REFINED_COUNTS = 3  # stage counts the local search refines, best initial cost first
# Defaults of plan() and replan(), the same as SchedulerConfig's (a unit test holds them
# together): candidate layouts scored, and the wall-clock backstop in seconds.
EVALUATIONS = 1200
BACKSTOP_S = 2.0


@dataclass
class Placement:
    """A plan found by the search: stages in pipeline order and its predicted step time."""
    stages: list[StagePlacement]
    step_s: float
    standby: tuple[int, ...] = ()  # workers given no stage (too small, or left over)
    why_standby: dict[int, str] | None = None
    evaluations: int = 0  # candidate layouts the local search scored
    backstop_hit: bool = False  # the wall-clock backstop stopped the search (the plan may vary)


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


def chunks(ids: list[int], s: int, small_first: bool = False) -> list[tuple[int, ...]]:
    """`ids` cut into s contiguous groups whose sizes differ by at most one (the larger
    groups first, or last with small_first)."""
    r, extra = divmod(len(ids), s)
    out, at = [], 0
    for i in range(s):
        size = r + (1 if (i >= s - extra if small_first else i < extra) else 0)
        out.append(tuple(ids[at:at + size]))
        at += size
    return out


def evaluate(groups: list[tuple[int, ...]], devices, net, model, work, polish: bool = False,
             budget: SearchBudget | None = None) -> tuple[float, list[StagePlacement] | None]:
    """Predicted step of `groups` (in pipeline order) with the best layer split found. The DP
    split balances compute; polish=True then moves single stage boundaries while the full
    predicted step (transfers, averaging) improves, or until `budget`'s backstop passes."""
    stages = split_layers(groups, devices, model, work)
    if stages is None:
        return float("inf"), None
    cost = predict_step(stages, devices, net, model, work).step_s
    # Each pass lowers the cost strictly or ends the polish, so it ends without a count (a
    # few passes, 1-2 ms on the bench scenarios); the backstop still bounds it.
    while polish and not (budget and budget.out_of_time()):
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


@dataclass(frozen=True)
class _Space:
    """The plans a search may return: which workers it may place (the others wait on standby),
    how many stages, and how many workers a group may hold."""
    ids: tuple[int, ...]  # usable workers
    counts: tuple[int, ...]  # stage counts allowed
    max_group: int = 0  # 0: no cap
    keep_workers: bool = False  # no move sends a placed worker to standby

    def allows(self, groups: list[tuple[int, ...]]) -> bool:
        return len(groups) in self.counts and not (self.max_group and any(len(g) > self.max_group for g in groups))


def _local_search(groups, devices, net, model, work, budget: SearchBudget, limit: int, rng: random.Random,
                  space: _Space, polish: bool = False):
    """First-improvement descent from `groups` until a round finds nothing better or the
    budget refuses an evaluation (`limit`: this search's share, see SearchBudget.take).
    Every candidate, 2-opt, swap or resize, takes one evaluation before it is scored; resizes
    stay in `space` (2-opt and swaps keep the count and sizes). `polish`: score every
    candidate with its layer boundaries polished (see evaluate)."""
    score = lambda g: evaluate(g, devices, net, model, work, polish=polish, budget=budget)  # noqa: E731
    cost, stages = score(groups)  # the start, scored already: free
    improved = True
    while improved:
        improved = False
        for i, j in pairs(len(groups)):  # 2-opt: reverse the run of stages i..j
            if not budget.take(limit):
                return groups, cost, stages
            cand = groups[:i] + groups[i:j + 1][::-1] + groups[j + 1:]
            c, st = score(cand)
            if c < cost - 1e-9:
                groups, cost, stages, improved = cand, c, st, True
        order = pairs(len(groups))
        rng.shuffle(order)  # worker swaps between groups, pairs of groups in random order
        for a, b in order:
            for cand in swaps(groups, a, b, devices):
                if not budget.take(limit):
                    return groups, cost, stages
                c, st = score(cand)
                if c < cost - 1e-9:  # take the first improving swap of this pair, move on
                    groups, cost, stages, improved = cand, c, st, True
                    break
        if improved:
            continue
        # Only once swaps settle: move one worker, changing the groups' sizes (or leaving it
        # out: on slow links a plan can be faster without a worker, even without a stage).
        placed = {w for g in groups for w in g}
        for cand in resizes(groups, [w for w in space.ids if w not in placed], devices, not space.keep_workers):
            if not space.allows(cand):
                continue
            if not budget.take(limit):
                return groups, cost, stages
            c, st = score(cand)
            if c < cost - 1e-9:
                groups, cost, stages, improved = cand, c, st, True
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
         stage_counts: list[int] | None = None, evaluations: int = EVALUATIONS, backstop_s: float = BACKSTOP_S,
         seed: int = 0, gone: frozenset[int] = frozenset(), clock: Callable[[], float] | None = None,
         max_group: int = 0, keep_workers: bool = False) -> Placement:
    """The best placement found in `evaluations` candidate layouts (see the module docstring;
    `backstop_s` of wall time on `clock` stops it sooner on pathological inputs); workers in
    `gone` have left; max_group (0: none) caps a replica group's size; keep_workers: the search
    leaves no worker out because the plan is faster without it (only one that no layout it
    starts from can fit), as the coordinator wants when it has chosen the workers to place."""
    budget = SearchBudget(evaluations, backstop_s, clock)
    rng = random.Random(seed)
    ids, why = usable(devices, model, work, gone)
    if not ids:
        raise ValueError("no worker can hold even one layer: " + "; ".join(why.values()))
    counts = stage_counts or list(range(1, min(len(ids), model.n_layer) + 1))
    space = _Space(tuple(ids), tuple(counts), max_group, keep_workers)
    starts = _starts(space, _site_chain(devices, ids, net), devices, net, model, work, budget)
    if not starts:
        raise ValueError(f"no stage count in {counts} fits the workers' memory")
    starts.sort(key=lambda x: x[0])
    refined = [groups for _, groups in starts[:REFINED_COUNTS]]  # the most promising stage counts
    best_cost, best_groups = float("inf"), None
    for k, groups in enumerate(refined):
        g, c, _ = _local_search(groups, devices, net, model, work, budget, budget.share(len(refined) - k), rng,
                                space)
        if c < best_cost:
            best_cost, best_groups = c, g
    best_groups = _spend_the_rest(best_cost, best_groups, starts[REFINED_COUNTS:], devices, net, model, work,
                                  budget, rng, space)
    best_cost, best_stages = evaluate(best_groups, devices, net, model, work, polish=True, budget=budget)
    assert best_stages is not None and not infeasible(best_stages, devices, model, work)
    assert space.allows([st.workers for st in best_stages])
    placed = {w for st in best_stages for w in st.workers}
    for w in ids:
        if w not in placed:
            why[w] = f"{devices[w].name}: the plan is faster or only fits without it; it waits on standby"
    return Placement(best_stages, best_cost, tuple(sorted(why)), why, budget.used, budget.backstop_hit)


def _spend_the_rest(best_cost: float, best_groups: list[tuple[int, ...]], others, devices, net, model, work,
                    budget: SearchBudget, rng: random.Random, space: _Space) -> list[tuple[int, ...]]:
    """The best groups once what the refined counts leave of the budget (a small swarm's
    descents settle early) is spent on descents that score candidates with polished layer
    boundaries (the split balances compute; where averaging is slow, fewer layers on
    replicated stages win, and only the polish sees it): from the best groups so far, then
    from more starting points, best first: `others` (the other counts' first layouts) and
    each site's workers alone (over slow links the best plan may keep to one site; single
    moves do not walk there from a plan spread over several). Scoring a site's start takes
    an evaluation."""
    more = list(others)
    for groups in _site_starts(devices, space):
        if not budget.take():
            break
        more.append((evaluate(groups, devices, net, model, work)[0], groups))
    for cost, groups in [(best_cost, best_groups), *sorted(more, key=lambda x: x[0])]:
        if cost == float("inf") or budget.used >= budget.evaluations or budget.out_of_time():
            break
        g, c, _ = _local_search(groups, devices, net, model, work, budget, budget.evaluations, rng, space,
                                polish=True)
        if c < best_cost:
            best_cost, best_groups = c, g
    return best_groups


def _site_starts(devices: list[Device], space: _Space):
    """For each site, biggest first, and each allowed stage count: its workers alone, fastest
    first, cut into that many groups."""
    by_site: dict[str, list[int]] = {}
    for i in sorted(space.ids, key=lambda i: -devices[i].tflops):
        by_site.setdefault(devices[i].site, []).append(i)
    for site in sorted(by_site, key=lambda s: (-len(by_site[s]), s)):
        for s in space.counts:
            if s <= len(by_site[site]) and space.allows(groups := chunks(by_site[site], s)):
                yield groups


def _starts(space: _Space, chain: list[int], devices, net, model, work,
            budget: SearchBudget) -> list[tuple[float, list[tuple[int, ...]]]]:
    """(predicted step, groups) of the first layout of each stage count that fits: `chain`
    cut into that many groups (the fastest workers of it only, where groups are capped).
    Bounded work, so not counted; only the backstop cuts it short (once one layout fits)."""
    starts = []
    for s in space.counts:
        if starts and budget.out_of_time():
            break
        members = list(chain)
        if space.max_group and len(members) > s * space.max_group:
            fastest = set(sorted(members, key=lambda i: -devices[i].tflops)[:s * space.max_group])
            members = [i for i in members if i in fastest]
        # A small device can make every split infeasible for its group: leave the smallest
        # out until the groups fit (they wait on standby).
        while len(members) >= s:
            # Groups of unequal size: try the smaller ones first and last in the pipeline (the
            # first stage is lighter: its embedding costs memory, not FLOPs).
            cost, groups = min(((evaluate(g, devices, net, model, work)[0], g)
                                for g in (chunks(members, s), chunks(members, s, small_first=True))),
                               key=lambda x: x[0])
            if cost < float("inf"):
                starts.append((cost, groups))
                break
            members.remove(min(members, key=lambda i: (devices[i].memory_gb, devices[i].tflops)))
    return starts


def layers_moved(before: list[StagePlacement], after: list[StagePlacement]) -> int:
    """Layers workers must load to go from `before` to `after` (a new worker loads its stage)."""
    return sum(_layers_to_load(before, after))


def move_stall_layers(before: list[StagePlacement], after: list[StagePlacement]) -> int:
    """The most layers any one worker must load to go from `before` to `after`. Workers load in
    parallel (each from a replica or the store), so a move holds the run up for about this many
    layer loads, not for their sum: pricing a move by the sum made a plan of 64 workers that moves
    half of them cost ~30x what it stalls, and kept a churned run on a plan made a minute in, on
    few measured links, for an hour (bench churn)."""
    return max(_layers_to_load(before, after), default=0)


def holders_reload(before: list, after: list) -> bool:
    """Must a worker that holds a stage in `before` reload to go to `after` (its range or stage
    changes)? Stages are anything with start, end and workers (StagePlacement, scheduler.StagePlan).
    Newcomers copy from a replica and workers set aside load nothing: neither holds the run up."""
    held = {w: (s.start, s.end) for s in before for w in s.workers}
    return any(w in held and held[w] != (s.start, s.end) for s in after for w in s.workers)


def move_cost_s(before: list[StagePlacement], after: list[StagePlacement], seconds_per_layer_load: float,
                reload_s: float = 0.0) -> float:
    """Seconds a move from `before` to `after` holds the run up: `reload_s` once when a holder must
    reload (holders_reload: the stages restart from the store, a cost no layer count shows; the
    ledger measures it, replan_stall.py), plus `seconds_per_layer_load` for each layer the worker
    that loads most must fetch (move_stall_layers)."""
    fixed = reload_s if reload_s > 0 and holders_reload(before, after) else 0.0
    return fixed + move_stall_layers(before, after) * seconds_per_layer_load


def _layers_to_load(before: list[StagePlacement], after: list[StagePlacement]) -> list[int]:
    """Per worker of `after`, the layers of its stage it does not hold in `before`."""
    held = {w: set(range(s.start, s.end)) for s in before for w in s.workers}
    return [len(set(range(s.start, s.end)) - held.get(w, set())) for s in after for w in s.workers]


def replan(current: list[StagePlacement], devices: list[Device], net: Network, model: ModelShape,
           work: Workload, seconds_per_layer_load: float, horizon_steps: int, evaluations: int = EVALUATIONS,
           backstop_s: float = BACKSTOP_S, seed: int = 0, gone: frozenset[int] = frozenset(),
           stage_counts: list[int] | None = None, max_group: int = 0, keep_workers: bool = False,
           clock: Callable[[], float] | None = None, reload_s: float = 0.0) -> Placement:
    """After a join, a leave or a new measurement: keep the current groups (minus workers that
    are gone, plus newcomers where they help most) unless a fresh search predicts a gain over
    `horizon_steps` steps that is worth the stall its moves cause (move_cost_s, with `reload_s`).
    stage_counts, evaluations, backstop_s, seed and clock drive the fresh search as in plan();
    max_group (0: none) caps a replica group's size, for newcomers and the fresh search;
    keep_workers as in plan()."""
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
    fresh = plan(devices, net, model, work, stage_counts=stage_counts, evaluations=evaluations,
                 backstop_s=backstop_s, seed=seed, gone=gone, clock=clock, max_group=max_group,
                 keep_workers=keep_workers)
    options = [(fresh.step_s, fresh.stages)]
    if groups and not (stage_counts and len(groups) not in stage_counts):
        options.append(evaluate(groups, devices, net, model, work))  # the same groups, layers re-split
        if len(groups) == len(current):  # the same groups on the same ranges: nothing reloads
            same = [StagePlacement(s.start, s.end, g) for s, g in zip(current, groups)]
            if not infeasible(same, devices, model, work):
                options.append((predict_step(same, devices, net, model, work).step_s, same))
    # Each option costs its steps over the horizon plus the stall its moves cause (move_cost_s).
    total = lambda o: o[0] * horizon_steps + move_cost_s(current, o[1], seconds_per_layer_load, reload_s)  # noqa: E731
    cost, stages = min((o for o in options if o[1] is not None), key=total)
    if stages is fresh.stages:
        return fresh
    return Placement(stages, cost, evaluations=fresh.evaluations, backstop_hit=fresh.backstop_hit)
