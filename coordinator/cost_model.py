"""The scheduler's cost model, pure: what a placement of stages and replicas costs per step.

A placement cuts the model's layers into pipeline stages (contiguous, any sizes) and gives
each stage a replica group of workers. For one optimizer step of M micro-batches:

  compute_i   seconds stage i needs per micro-batch: 6 x params(stage i) x tokens FLOPs
              (forward + backward) over the group's summed rate (each micro-batch goes to
              one replica, so replicas add throughput); the blocks at the rate measured on
              one block, the last stage's head at the rate measured on the head (its
              softmax over the vocabulary is memory-bound: worker/probe.py)
  transfer_i  seconds per micro-batch across boundary i -> i+1, each direction (links are
              full duplex): latency + activation bytes after compression / bandwidth, with
              the group pair's slowest link (a micro-batch may take any of them) times the
              parallel links that carry the boundary (min of the two group sizes)
  pipeline    sum of every compute and both directions of every transfer for the first
              micro-batch (fill + drain), plus (M - 1) x the slowest of them (steady state)
  averaging_i ring all-reduce of stage i's gradients over its group: 2 (R-1)/R x bytes /
              the group's slowest rate + 2 (R-1) x its largest latency, where the rate is its
              slowest link, or a member's measured averaging rate when that is slower (the
              rounds go through hivemind's averager, which a fast link does not make fast:
              averaging_rate_gbps); stages average in parallel, after the pipeline drains
  step        pipeline + max averaging_i

Memory per worker of stage i: coordinator/memory_model.py (weights, gradients, optimizer
state, autocast copies and the activations of the micro-batches in flight, with or without
activation checkpointing). No I/O; no imports of ours but that model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from .memory_model import StageMemory, StageShape, TrainingSetup, stage_memory

MEMORY_HEADROOM = 0.9  # fraction of device memory a plan may use (allocator, CUDA context)


@dataclass(frozen=True)
class Device:
    """A worker as the scheduler sees it: measured rate, memory, and where it sits."""

    name: str
    tflops: float  # measured matmul rate at the run's dtype, TFLOP/s
    memory_gb: float
    site: str = ""  # links are looked up between sites (a region, a machine)
    # The payload rate of the averaging rounds this worker took part in (averaging_rate_gbps),
    # Gbit/s; inf until it has averaged: its links alone then price its group's rounds
    averaging_gbps: float = math.inf
    # measured rate of the final norm, LM head and loss, TFLOP/s (worker/probe.measure_head_tflops);
    # 0: not measured, `tflops` prices the head too
    head_tflops: float = 0.0

    @property
    def head_rate(self) -> float:
        """TFLOP/s the last stage's head runs at on this device."""
        return self.head_tflops if self.head_tflops > 0 else self.tflops


@dataclass(frozen=True)
class Link:
    """A measured link between two devices: one-way latency (ms) and bandwidth (Mbit/s)."""
    latency_s: float
    gbps: float  # Gbit/s


class Network:
    """Links between devices: by site pair, with one figure inside a site."""

    def __init__(self, between: dict[tuple[str, str], Link], inside: Link):
        self.between = {**between, **{(b, a): link for (a, b), link in between.items()}}
        self.inside = inside
        # worst links between (or inside) sets of sites, memoized: a placement search asks for
        # the same groups' links ~10^5 times, and in the live coordinator every worker is a site,
        # so one boundary between groups of 8 is 64 lookups
        self._worst: dict[tuple, Link] = {}

    def link(self, a: Device, b: Device) -> Link:
        return self.site_link(a.site, b.site)

    def site_link(self, a: str, b: str) -> Link:
        if a == b:
            return self.inside
        try:
            return self.between[(a, b)]
        except KeyError:
            raise ValueError(f"no link measured between sites {a!r} and {b!r}") from None

    def worst_between(self, a: frozenset[str], b: frozenset[str]) -> Link:
        """The slowest link from any site of `a` to any of `b`: the largest latency and the least
        bandwidth among them (they may come from different pairs)."""
        key = ("between", a, b)
        found = self._worst.get(key)
        if found is None:
            if not a or not b:
                raise ValueError(f"the worst link between {sorted(a)} and {sorted(b)}: both need a site")
            found = self._store(key, self._worst_of((x, y) for x in a for y in b))
        return found

    def worst_within(self, sites: frozenset[str], crowded: frozenset[str]) -> Link:
        """The slowest link a replica group spread over `sites` uses: between each pair of them,
        and inside each of `crowded` (sites holding two members or more)."""
        key = ("within", sites, crowded)
        found = self._worst.get(key)
        if found is None:
            if len(sites) < 2 and not crowded:
                raise ValueError(f"a replica group on sites {sorted(sites)} uses no link: it needs two members")
            ordered = sorted(sites)
            pairs = ((x, y) for i, x in enumerate(ordered) for y in ordered[i + 1:])  # each pair once
            found = self._store(key, self._worst_of(pairs, self.inside if crowded else None))
        return found

    def _worst_of(self, pairs: Iterable[tuple[str, str]], worst: Link | None = None) -> Link:
        """The largest latency and the least bandwidth of the links between the sites of each pair
        (and of `worst`, if given). One loop of plain comparisons: a search's candidates rarely
        repeat a pair of groups, so most lookups miss the memo and come here, ~10^5 times a
        search (a list of Links and two generator passes over it cost twice as much)."""
        between, inside = self.between, self.inside
        latency, gbps = (worst.latency_s, worst.gbps) if worst is not None else (0.0, math.inf)
        for pair in pairs:
            x, y = pair
            link = inside if x == y else between.get(pair)
            if link is None:
                self.site_link(x, y)  # raises, naming the pair
            if link.latency_s > latency:
                latency = link.latency_s
            if link.gbps < gbps:
                gbps = link.gbps
        return Link(latency, gbps)

    def _store(self, key: tuple, worst: Link) -> Link:
        if len(self._worst) > 500_000:  # a bound, far above what one search asks for
            self._worst.clear()
        self._worst[key] = worst
        return worst


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of the model: per layer, the embedding and the LM head."""
    n_layer: int
    d_model: int
    layer_params: int  # parameters of one transformer block
    embed_params: int  # token embedding (stage 0)
    head_params: int  # final norm + LM head (last stage)

    @staticmethod
    def gptj_6b() -> ModelShape:
        d, vocab = 4096, 50400
        return ModelShape(n_layer=28, d_model=d, layer_params=201_355_264, embed_params=vocab * d,
                          head_params=vocab * d + vocab + 2 * d)


@dataclass(frozen=True)
class Workload:
    """One optimizer step as the pipeline sees it."""

    tokens_per_micro_batch: int  # micro-batch x sequence length
    micro_batches: int  # per step (M)
    in_flight: int  # micro-batches a stage holds activations for at once
    activation_bytes_per_value: float = 2.0  # fp16 on the wire; q4 ~0.53, q3 ~0.41
    gradient_bytes_per_param: float = 2.0  # averaging all-reduce payload per parameter (fp16)
    eight_bit_adam: bool = False  # optimizer moments in 8 bits (2 bytes a parameter, not 8)
    precision: str = "bf16"  # autocast precision of the stages: 'fp32', 'bf16' or 'fp16'
    seq_len: int = 0  # sequence length (the attention mask a micro-batch keeps); 0: not counted
    checkpoint_segment: int = 0  # pipeline.activation_checkpointing: 0 none, K blocks a segment

    def memory_setup(self) -> TrainingSetup:
        return TrainingSetup(tokens_per_micro_batch=self.tokens_per_micro_batch, in_flight=self.in_flight,
                             seq_len=self.seq_len, precision=self.precision, eight_bit_adam=self.eight_bit_adam,
                             checkpoint_segment=self.checkpoint_segment)


@dataclass(frozen=True)
class StagePlacement:
    """Layers [start, end) held by a group of devices (indices into the device list)."""
    start: int  # first layer
    end: int  # one past the last layer
    workers: tuple[int, ...]  # indices into the device list: the stage's replica group


@dataclass(frozen=True)
class StepEstimate:
    """The cost model's prediction of one step, and its parts (seconds)."""
    step_s: float
    pipeline_s: float
    averaging_s: float
    compute_s: tuple[float, ...]  # per stage, per micro-batch
    transfer_s: tuple[float, ...]  # per boundary, per micro-batch, one direction


def stage_params(model: ModelShape, start: int, end: int) -> int:
    """Parameters of the stage holding layers [start, end) (+ embedding first, + head last)."""
    params = (end - start) * model.layer_params
    if start == 0:
        params += model.embed_params
    if end == model.n_layer:
        params += model.head_params
    return params


@functools.lru_cache(maxsize=65536)  # a placement search asks for the same stages ~10^5 times
def stage_memory_of(model: ModelShape, work: Workload, start: int, end: int) -> StageMemory:
    """What one replica of the stage holding layers [start, end) holds, by kind."""
    shape = StageShape(blocks=end - start, d_model=model.d_model, vocab=model.embed_params // model.d_model,
                       block_params=model.layer_params, embed=start == 0, head=end == model.n_layer)
    return stage_memory(shape, work.memory_setup())


def memory_needed_gb(model: ModelShape, work: Workload, start: int, end: int) -> float:
    """Bytes one replica of a stage holding layers [start, end) needs, in GB."""
    return stage_memory_of(model, work, start, end).total / 1e9


def infeasible(plan: list[StagePlacement], devices: list[Device], model: ModelShape, work: Workload) -> str:
    """'' when every worker can hold its stage, else why not (naming the worker and what the
    stage's memory goes to)."""
    for i, s in enumerate(plan):
        memory = stage_memory_of(model, work, s.start, s.end)
        for w in s.workers:
            if memory.total / 1e9 > devices[w].memory_gb * MEMORY_HEADROOM:
                return (f"stage {i} (layers {s.start}-{s.end}) needs {memory.describe()} per replica; "
                        f"{devices[w].name} has {devices[w].memory_gb:g} GB, of which a plan uses "
                        f"{MEMORY_HEADROOM:.0%} (pipeline.activation_checkpointing or more stages need less)")
    return ""


def stage_compute_s(model: ModelShape, work: Workload, s: StagePlacement, devices: list[Device]) -> float:
    """Seconds stage `s` computes per micro-batch (forward + backward) on its group's summed rate:
    its blocks at the blocks' rate, the head (last stage) at the head's (Device.head_rate). The
    embedding is a lookup, not a matmul: its parameters cost memory, not FLOPs."""
    per_param = 6 * work.tokens_per_micro_batch / 1e12  # TFLOP a parameter costs per micro-batch
    seconds = (s.end - s.start) * model.layer_params * per_param / sum(devices[w].tflops for w in s.workers)
    if s.end == model.n_layer:
        seconds += model.head_params * per_param / sum(devices[w].head_rate for w in s.workers)
    return seconds


def transfer_s(model: ModelShape, work: Workload, a: StagePlacement, b: StagePlacement,
               devices: list[Device], net: Network) -> float:
    """Seconds one micro-batch's activations take from stage `a` to stage `b` (one direction)."""
    # links depend on sites only: one lookup per pair of sites, not per pair of workers
    worst = net.worst_between(frozenset(devices[w].site for w in a.workers),
                              frozenset(devices[w].site for w in b.workers))
    gbps = worst.gbps * min(len(a.workers), len(b.workers))
    nbytes = work.tokens_per_micro_batch * model.d_model * work.activation_bytes_per_value
    return worst.latency_s + nbytes * 8 / (gbps * 1e9)


def allreduce_s(model: ModelShape, work: Workload, s: StagePlacement, devices: list[Device], net: Network) -> float:
    """Seconds stage `s`'s replica group takes to average its gradients (ring all-reduce)."""
    r = len(s.workers)
    if r <= 1:
        return 0.0
    sites, crowded = set(), set()
    for w in s.workers:
        site = devices[w].site
        (crowded if site in sites else sites).add(site)
    # links depend on sites only: inside each site with two workers or more, and between sites
    worst = net.worst_within(frozenset(sites), frozenset(crowded))
    gbps = min(worst.gbps, min(devices[w].averaging_gbps for w in s.workers))
    return 2 * (r - 1) / r * averaged_bytes(model, work, s.start, s.end) * 8 / (gbps * 1e9) + 2 * (r - 1) * worst.latency_s


def averaged_bytes(model: ModelShape, work: Workload, start: int, end: int) -> float:
    """Bytes of the stage holding layers [start, end) that its replicas average each round."""
    return stage_params(model, start, end) * work.gradient_bytes_per_param


def averaging_rate_gbps(model: ModelShape, work: Workload, start: int, end: int, replicas: int,
                        seconds: float) -> float:
    """The rate, Gbit/s, at which a group of `replicas` averaged the stage holding layers
    [start, end) in a round of `seconds`: allreduce_s's payload term solved for the rate, with
    everything else the round took (matchmaking, the averager's own work, its latencies) put in
    it, so that allreduce_s gives this group back `seconds` (plus its links' latencies, which
    the rate already holds: a slight overestimate)."""
    if replicas < 2 or not seconds > 0:
        raise ValueError(f"an averaging rate needs a group of 2 or more and a round of > 0 s; got {replicas} "
                         f"replica(s) in {seconds!r} s")
    return 2 * (replicas - 1) / replicas * averaged_bytes(model, work, start, end) * 8 / (seconds * 1e9)


def predict_step(plan: list[StagePlacement], devices: list[Device], net: Network, model: ModelShape,
                 work: Workload) -> StepEstimate:
    """Predicted seconds per optimizer step of `plan` (see the module docstring)."""
    if not plan or plan[0].start != 0 or plan[-1].end != model.n_layer or any(
            a.end != b.start for a, b in zip(plan, plan[1:])) or any(s.end <= s.start or not s.workers for s in plan):
        raise ValueError(f"a plan needs contiguous non-empty stages over layers 0-{model.n_layer}, each with "
                         f"workers; got {[(s.start, s.end, len(s.workers)) for s in plan]}")
    compute = tuple(stage_compute_s(model, work, s, devices) for s in plan)
    transfer = tuple(transfer_s(model, work, a, b, devices, net) for a, b in zip(plan, plan[1:]))
    slowest = max((*compute, *transfer))
    pipeline = sum(compute) + 2 * sum(transfer) + (work.micro_batches - 1) * slowest
    averaging = max(allreduce_s(model, work, s, devices, net) for s in plan)
    return StepEstimate(pipeline + averaging, pipeline, averaging, compute, transfer)
