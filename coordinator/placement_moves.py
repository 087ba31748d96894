"""The placement search's moves, pure: the candidate layouts one move away from a layout.

A layout is a list of replica groups (tuples of device indices) in pipeline order; its layer
split is the search's business (placement.evaluate). Moves that would exchange or move a
device for one of the same kind (speed, memory, site, averaging rate) are skipped: the cost model cannot
tell them apart.
"""

from __future__ import annotations

from .cost_model import Device


def pairs(n: int) -> list[tuple[int, int]]:
    """Every pair of group positions a < b."""
    return [(a, b) for a in range(n) for b in range(a + 1, n)]


def swaps(groups: list[tuple[int, ...]], a: int, b: int, devices: list[Device]):
    """`groups` with one worker of group a and one of group b exchanged, each distinct swap."""
    for x in range(len(groups[a])):
        for y in range(len(groups[b])):
            ga, gb = list(groups[a]), list(groups[b])
            if kind(devices[ga[x]]) == kind(devices[gb[y]]):
                continue  # swapping equals changes nothing
            ga[x], gb[y] = gb[y], ga[x]
            cand = list(groups)
            cand[a], cand[b] = tuple(ga), tuple(gb)
            yield cand


def kind(device: Device) -> tuple:
    """What the cost model reads of a device: two of the same kind are interchangeable."""
    return device.tflops, device.memory_gb, device.site, device.averaging_gbps, device.head_tflops


def resizes(groups: list[tuple[int, ...]], standby: list[int], devices: list[Device], drop: bool = True):
    """`groups` with one worker moved: to another group, to a stage of its own just before or
    after its group, to standby, or from standby into a group or in place of a worker (a group
    left empty goes: one stage fewer); or two neighbouring groups merged. One move per kind of
    device and place. drop=False: no move sends a worker to standby."""
    for a, g in enumerate(groups):
        kinds = set()
        for x, w in enumerate(g):
            if kind(devices[w]) in kinds:
                continue
            kinds.add(kind(devices[w]))
            rest = g[:x] + g[x + 1:]
            for b in [*range(len(groups)), None]:  # None: standby
                if b == a or (b is None and (not drop or (len(groups) == 1 and not rest))):
                    continue
                cand = list(groups)
                cand[a] = rest
                if b is not None:
                    cand[b] = cand[b] + (w,)
                yield [c for c in cand if c]
            if rest:  # a stage of its own
                yield [*groups[:a], (w,), rest, *groups[a + 1:]]
                yield [*groups[:a], rest, (w,), *groups[a + 1:]]
    for a in range(len(groups) - 1):
        yield [*groups[:a], groups[a] + groups[a + 1], *groups[a + 2:]]
    kinds = set()
    for w in standby:
        if kind(devices[w]) in kinds:
            continue
        kinds.add(kind(devices[w]))
        for b, g in enumerate(groups):
            cand = list(groups)
            cand[b] = g + (w,)
            yield cand
            if not drop:
                continue
            there = {kind(devices[w])}
            for x, v in enumerate(g):
                if kind(devices[v]) not in there:
                    there.add(kind(devices[v]))
                    cand = list(groups)
                    cand[b] = g[:x] + (w,) + g[x + 1:]
                    yield cand


def keep_in_place(groups: list[tuple[int, ...]], current: list,
                   index: dict[str, int]) -> list[tuple[int, ...]] | None:
    """The same groups, reordered so each goes to the stage most of its workers hold now
    (groups nobody holds fill the stages left), or None when that is the order already.
    `current`: the plan in force (each stage with .workers, ids); `index`: worker id -> device."""
    holds = {index[w]: i for i, s in enumerate(current) for w in s.workers if w in index}
    order: list[tuple[int, ...] | None] = [None] * len(groups)
    rest = []
    for g in sorted(groups, key=lambda g: -sum(w in holds for w in g)):
        votes = [holds[w] for w in g if w in holds]
        stage = max(set(votes), key=votes.count) if votes else None
        if stage is not None and stage < len(order) and order[stage] is None:  # (the new plan may have fewer stages)
            order[stage] = g
        else:
            rest.append(g)
    for i in range(len(order)):
        if order[i] is None:
            order[i] = rest.pop(0)
    return None if order == list(groups) else order
