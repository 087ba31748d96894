"""Stage planning for the running coordinator, pure: live workers + measured links -> a plan.

The ledger hands this module what it knows (each live worker's probed device and current
stage, the link measurements workers reported) and gets back layer ranges per stage, which
workers form each stage's replica group, and the step time the cost model predicts
(cost_model.py), searched by placement.py. No I/O, no clock: the ledger decides when to ask
and when a plan may be applied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from gptjt_core.codec_sizes import CODECS, bytes_per_value
from gptjt_core.config import RunConfig, SchedulerConfig
from gptjt_core.stage_spec import StageSpec

from .cost_model import (MEMORY_HEADROOM, Device, Link, ModelShape, Network, StagePlacement, Workload, memory_needed_gb,
                         predict_step)
from .placement import evaluate, layers_moved, move_cost_s, move_stall_layers, plan, replan, usable
from .placement_moves import keep_in_place
from .plan_horizon import Horizon
from .sites import SiteMap, fill_links

# Bytes per value on the wire, per codec (block codecs: codes plus a bfloat16 scale per 128
# values), from the codecs themselves so a format change reaches the plans.
CODEC_BYTES = {codec: bytes_per_value(codec) for codec in CODECS}
AVERAGING_BYTES = {"none": 4.0, "fp16": 2.0, "8bit-blockwise": 1 + 4 / 128}


def plan_stages(n_layer: int, num_stages: int) -> list[StageSpec]:
    """Contiguous stages with layer counts differing by at most one; stage 0 embeds, the
    last holds the LM head. The plan before any worker has been measured."""
    if num_stages > n_layer:
        raise ValueError(f"pipeline.num_stages = {num_stages} exceeds the model's {n_layer} layers; "
                         "use at most one stage per layer")
    return StageSpec.even_split(n_layer, num_stages)


@dataclass(frozen=True)
class WorkerView:
    """A live worker as the scheduler sees it."""

    id: str
    address: str
    tflops: float  # measured (or simulated) rate at the run's dtype
    memory_gb: float  # 1e9 bytes
    stage: int = -1  # current stage (-1: standby)
    # its averaging rounds' payload rate, Gbit/s, as the coordinator timed them (cost_model
    # averaging_rate_gbps; Measurements.record_averaging); inf until it has averaged
    averaging_gbps: float = math.inf
    head_tflops: float = 0.0  # measured rate of the LM head and loss (cost_model.Device.head_tflops); 0: tflops


@dataclass(frozen=True)
class LinkView:
    """A measured link from worker `src` to the worker serving at `dst_address`."""

    src: str
    dst_address: str
    latency_ms: float
    mbit: float

    @functools.cached_property
    def link(self) -> Link:
        """As the cost model takes it (seconds, Gbit/s): made once per measurement, which the
        ledger keeps (Measurements.link_views) while every decision reads all of them."""
        return Link(self.latency_ms / 1e3, self.mbit / 1e3)


@dataclass
class StagePlan:
    """One stage of a plan: layers [start, end) and the ids of its replica group."""
    start: int
    end: int
    workers: tuple[str, ...]  # worker ids of the stage's replica group

    def spec(self, n_layer: int) -> StageSpec:
        return StageSpec(self.start, self.end, embed=self.start == 0, head=self.end == n_layer)


@dataclass
class PlanDecision:
    """The scheduler's answer: the plan, its predicted step time, who waits on standby and why."""
    stages: list[StagePlan]
    predicted_step_s: float
    standby: dict[str, str] = field(default_factory=dict)  # worker id -> why it has no stage
    layers_moved: int = 0  # layers workers must load to go from the current plan to this one
    stall_layers: int = 0  # the most of them one worker loads: loads run in parallel (move_stall_layers)
    current_step_s: float = float("inf")  # the current plan's prediction with today's figures
    # every worker a search of this decision could place (the candidate sets): only links among
    # them can change a plan, so only they are asked to measure, and only towards each other
    candidates: tuple[str, ...] = ()
    # the search's wall-clock backstop (search_budget.py) cut it short: the plan then depends on
    # how loaded the machine was, not only on its inputs
    backstop_hit: bool = False


class DecisionMemo:
    """The searches' answers, by what they saw: the candidate workers and their figures, the
    links among them and the plan in force. A join, death or measurement that changes none of
    that (a slow newcomer beyond max_stages x replicas_per_stage workers, a standby worker's
    link, a device re-measured the same) gets the earlier answer back instead of a new search:
    each search costs 0.1-0.5 s of the coordinator's CPU at 64 candidates (bench scheduler,
    plan_ms), and in a swarm of thousands most joins and deaths are of workers no plan would
    take. Not thread-safe; one per ledger (coordinator/ledger/planning.py)."""

    def __init__(self, size: int = 16):
        self.size, self.kept, self.hits, self.searches = size, OrderedDict(), 0, 0
        self.backstop_hits = 0  # searches the wall-clock backstop cut short (PlanDecision.backstop_hit)

    def get(self, key: tuple) -> PlanDecision | None:
        found = self.kept.get(key)
        if found is None:
            return None
        self.kept.move_to_end(key)
        self.hits += 1
        return dataclasses.replace(found, standby=dict(found.standby))

    def put(self, key: tuple, decision: PlanDecision) -> None:
        self.searches += 1
        self.backstop_hits += decision.backstop_hit
        self.kept[key] = dataclasses.replace(decision, standby=dict(decision.standby))
        while len(self.kept) > self.size:
            self.kept.popitem(last=False)


def _memo_key(candidates: list[WorkerView], net: Network, current: list[StagePlan] | None, horizon: Horizon) -> tuple:
    return (horizon, tuple((w.id, w.address, w.tflops, w.memory_gb, w.averaging_gbps, w.head_tflops)
                           for w in candidates),
            tuple(sorted(net.between.items())), net.inside,
            tuple((s.start, s.end, s.workers) for s in current or ()))


def model_shape(n_layer: int, d_model: int, d_inner: int, vocab: int) -> ModelShape:
    """Parameter counts of a GPT-J: a block is ln_1 + q, k, v, out (no biases) + fc_in, fc_out."""
    layer = 2 * d_model + 4 * d_model * d_model + 2 * d_model * d_inner + d_inner + d_model
    return ModelShape(n_layer=n_layer, d_model=d_model, layer_params=layer, embed_params=vocab * d_model,
                      head_params=vocab * d_model + vocab + 2 * d_model)


def workload(run: RunConfig) -> Workload:
    """The run's step as the cost model sees it: micro-batch tokens, micro-batches per step,
    micro-batches in flight, wire bytes per activation and gradient value, state bytes."""
    t, p = run.train, run.pipeline
    codec = run.link.slow_activation_codec if run.link.adaptive_codecs else p.activation_codec
    return Workload(tokens_per_micro_batch=t.micro_batch * t.seq_len,
                    micro_batches=max(1, t.global_batch // t.micro_batch),
                    in_flight=p.in_flight,
                    activation_bytes_per_value=CODEC_BYTES.get(codec, 2.0),
                    gradient_bytes_per_param=AVERAGING_BYTES.get(run.averaging.compression, 4.0),
                    eight_bit_adam=run.optim.eight_bit, seq_len=t.seq_len,
                    # 'auto' is bf16 on the GPUs a plan is for (fp16 keeps the same bytes)
                    precision=t.precision if t.precision in ("fp32", "bf16", "fp16") else "bf16",
                    checkpoint_segment=p.checkpoint_segment)


def _network(workers: list[WorkerView], measured: dict[tuple[str, str], Link], cfg: SchedulerConfig,
             sites: SiteMap | None = None) -> Network:
    """Each worker is a site of the Network; a pair takes its measured link (`measured`:
    measured_pairs, the slower direction when both were measured), else the typical link between
    the sites found from measured latencies (coordinator/sites.py; `sites`, found once per decision
    from every live worker's links, not only `workers`'), else the configured default."""
    default = Link(cfg.default_link_latency_ms / 1e3, cfg.default_link_mbit / 1e3)
    return Network(fill_links([w.id for w in workers], measured, cfg.site_latency_ms, default, sites),
                   inside=default)


def measured_pairs(links: list[LinkView], live: list[WorkerView]) -> dict[tuple[str, str], Link]:
    """(a, b) with a < b -> the measured link between two of the `live` workers (the slower
    direction when both were measured)."""
    by_address = {w.address: w.id for w in live}
    ids = set(by_address.values())
    measured: dict[tuple[str, str], Link] = {}
    for m in links:
        dst = by_address.get(m.dst_address)
        if dst is None or dst == m.src or m.src not in ids or m.mbit <= 0:
            continue
        link = m.link
        key = (m.src, dst) if m.src < dst else (dst, m.src)
        old = measured.get(key)
        measured[key] = link if old is None else Link(max(old.latency_s, link.latency_s), min(old.gbps, link.gbps))
    return measured


def _within(measured: dict[tuple[str, str], Link], workers: list[WorkerView],
            cfg: SchedulerConfig) -> tuple[dict[tuple[str, str], Link], SiteMap]:
    """measured_pairs(links, workers) from the pairs of live workers that include them, without
    reading every link again (~10^4 at 1,000 workers), and the sites found from those pairs (the
    plan in force and the proposals are priced on them)."""
    ids = {w.id for w in workers}
    within = {pair: link for pair, link in measured.items() if pair[0] in ids and pair[1] in ids}
    return within, SiteMap.find(ids, within, cfg.site_latency_ms)


def _devices(workers: list[WorkerView]) -> list[Device]:
    return [Device(w.id, max(w.tflops, 1e-9), w.memory_gb, site=w.id, averaging_gbps=w.averaging_gbps,
                   head_tflops=max(w.head_tflops, 0.0)) for w in workers]


def decide(run: RunConfig, shape: ModelShape, workers: list[WorkerView], links: list[LinkView],
           current: list[StagePlan] | None, memo: DecisionMemo | None = None,
           keep_if_faster: bool = False, proposals: tuple[list[StagePlan], ...] = (),
           horizon: Horizon | None = None) -> PlanDecision | None:
    """The plan for these workers, or None when they cannot fill every stage.

    The plan has pipeline.num_stages stages, or any count in min_stages .. max_stages when those
    bound it (the search compares them). At most (the most stages) x replicas_per_stage workers
    take part (replicas_per_stage a group). Sites are found once for all. Two candidate sets are
    solved: the fastest workers, and today's holders topped up with the fastest others; with
    a current plan, placement.replan keeps it unless moving pays off. The set whose plan costs
    least over `horizon` (default: Horizon.of(scheduler)) wins: hysteresis at both levels. `memo`:
    earlier searches' answers, reused for the same candidates, links and current plan. keep_if_faster:
    the plan in force stays unless the best plan's saving over `horizon` pays back its moves (the
    ledger asks it once its plan could start). proposals: earlier searches' plans not applied yet, priced too."""
    cfg, work = run.scheduler, workload(run)
    horizon = horizon or Horizon.of(cfg)
    counts, replicas = run.pipeline.stage_counts, run.pipeline.replicas_per_stage
    fits, why = usable(_devices(workers), shape, work)
    standby = {workers[i].id: reason for i, reason in why.items()}
    # Fastest first; among equally fast ones, those holding a stage (a newcomer no faster than a
    # holder does not displace it: no search, no move for nothing), then by id.
    pool = sorted((workers[i] for i in fits), key=lambda w: (-w.tflops, w.stage < 0, w.id))
    cap = max(counts) * replicas
    held = {w for s in current or [] for w in s.workers}
    holders = [w for w in pool if w.id in held][:cap]
    keep = holders + [w for w in pool if w.id not in held][:cap - len(holders)]
    sets = [pool[:cap]] + ([keep] if {w.id for w in keep} != {w.id for w in pool[:cap]} else [])
    measured, options = measured_pairs(links, workers), []
    sites = SiteMap.find([w.id for w in workers], measured, cfg.site_latency_ms)  # one for every network below
    for candidates in sets:
        if len(candidates) < min(counts):
            continue
        net = _network(candidates, measured, cfg, sites)
        key = _memo_key(candidates, net, current, horizon) if memo is not None else None
        try:
            found = memo.get(key) if memo is not None else None
            if found is None:
                found = _decide_among(run, shape, work, candidates, net, current, horizon)
                if memo is not None:
                    memo.put(key, found)
            options.append(found)
        except ValueError as e:  # nothing fits: every stage would be too big for some worker
            for w in candidates:
                standby.setdefault(w.id, str(e))
    measured, sites = _within(measured, pool, cfg)
    options += _proposed(run, shape, proposals, pool, measured, current, sites)
    if not options:
        return None
    best = min(options, key=lambda d: horizon.cost_s(d.predicted_step_s, current or [], d.stages))
    now_s = predict_plans_s(run, shape, [current or []], pool, measured, sites)[0]
    if keep_if_faster and now_s * horizon.steps <= horizon.cost_s(best.predicted_step_s, current or [], best.stages):
        # The search fills every group, so offers none left short (vacancy_choice), and plans afresh when a stage
        # lost every candidate (bench churn: 66.7 s/step applied over 50.8); kept unless the best pays back its
        # moves over the horizon (12 simulated volunteers: a join moved 7 layers, 280 s of loads, for 0.027 s/step)
        best = PlanDecision([StagePlan(s.start, s.end, s.workers) for s in current], now_s)
    _explain_standby(best, pool, standby, replicas)
    best.current_step_s = now_s
    best.candidates = tuple(dict.fromkeys(w.id for candidates in sets for w in candidates))
    return best


def _proposed(run: RunConfig, shape: ModelShape, proposals: tuple[list[StagePlan], ...], pool: list[WorkerView],
              measured: dict[tuple[str, str], Link], current: list[StagePlan] | None,
              sites: SiteMap | None = None) -> list[PlanDecision]:
    """`proposals` as decisions priced with today's figures, without their workers that left or
    cannot hold their stage now (fits_stage: a device re-measured with less memory; a group may be
    a replica short; a proposal that lost a whole group is dropped). A search ends by its
    evaluation count and sees the candidates that live at that moment, so it does not find the
    same plan each time: bench churn saw a plan at 51 s/step (the one in force 59 s) pended, then
    dropped by the next search, which found nothing better than the plan in force, before the
    checkpoint it waited for."""
    by_id = {w.id: w for w in pool}
    kept = [[StagePlan(s.start, s.end, tuple(w for w in s.workers if w in by_id
                                             and fits_stage(run, shape, by_id[w], s.spec(shape.n_layer))))
             for s in p] for p in proposals]
    if not kept:
        return []
    times = predict_plans_s(run, shape, kept, pool, measured, sites)  # measured: measured_pairs of `pool`
    # predict_plans_s: inf for a proposal with an empty group
    return [PlanDecision(p, t, {}, *_moved(current, p)) for p, t in zip(kept, times) if t < float("inf")]


def _explain_standby(decision: PlanDecision, pool: list[WorkerView], unfit: dict[str, str], replicas: int) -> None:
    """Say in `decision.standby` why each worker it leaves out waits (`unfit`: those that fit nowhere)."""
    placed = {w for st in decision.stages for w in st.workers}
    for w in pool:
        if w.id not in placed and w.id not in decision.standby:
            decision.standby[w.id] = (f"the plan is predicted fastest with the workers it places (at most "
                                      f"{replicas} replica(s) a stage); it takes a stage when one frees up or a "
                                      "re-plan prefers it")
    decision.standby.update({k: v for k, v in unfit.items() if k not in placed})


def too_small(run: RunConfig, shape: ModelShape, workers: list[WorkerView]) -> dict[str, str]:
    """Workers whose memory cannot hold even one layer of this run, and why."""
    _, why = usable(_devices(workers), shape, workload(run))
    return {workers[i].id: reason for i, reason in why.items()}


def fits_stage(run: RunConfig, shape: ModelShape, worker: WorkerView, spec: StageSpec) -> bool:
    """Can this worker's memory hold the whole stage (its layers' weights, optimizer state and
    activations, with the placement search's headroom)? A standby worker that fills a stage
    left empty between searches must fit that stage, not just one layer of the model."""
    return worker.memory_gb * MEMORY_HEADROOM >= memory_needed_gb(shape, workload(run), spec.start, spec.end)


def _decide_among(run: RunConfig, shape: ModelShape, work: Workload, candidates: list[WorkerView], net: Network,
                  current: list[StagePlan] | None, horizon: Horizon) -> PlanDecision:
    cfg = run.scheduler
    counts, replicas = run.pipeline.stage_counts, run.pipeline.replicas_per_stage
    devices = _devices(candidates)
    index = {w.id: i for i, w in enumerate(candidates)}
    old = _as_old(current or [], index)
    if len(old) not in counts or not all(s.workers for s in old):
        old = []  # a stage lost every candidate (or there is no plan yet): nothing to keep
    # The candidates fill replicas_per_stage replicas a stage (the first step waits for
    # start_with_replicas of them): the search may move them between groups, up to that many
    # a group, but not leave one out because the prediction is faster without it.
    if cfg.placement != "cost-model":
        result = None
    elif old:
        result = replan(old, devices, net, shape, work, seconds_per_layer_load=horizon.layer_load_s,
                        horizon_steps=horizon.steps, evaluations=cfg.search_evaluations,
                        backstop_s=cfg.search_budget_s, stage_counts=counts, max_group=replicas, keep_workers=True,
                        reload_s=horizon.reload_s)
    else:
        result = plan(devices, net, shape, work, stage_counts=counts, evaluations=cfg.search_evaluations,
                      backstop_s=cfg.search_budget_s, max_group=replicas, keep_workers=True)
    if result is None or len(result.stages) not in counts:
        fitting = [c for c in counts if c <= len(candidates)]  # not empty: decide() checked min(counts)
        stages = run.pipeline.num_stages if run.pipeline.num_stages in fitting else max(fitting)
        specs = plan_stages(shape.n_layer, stages)
        groups = [tuple(candidates[i].id for i in range(k, len(candidates), stages)) for k in range(stages)]
        even = [StagePlan(s.start, s.end, g) for s, g in zip(specs, groups)]
        predicted = predict_step(_as_old(even, index), devices, net, shape, work).step_s
        return PlanDecision(even, predicted, {}, *_moved(current, even))
    standby = {candidates[i].id: why for i, why in (result.why_standby or {}).items()}
    result_stages, result_s = result.stages, result.step_s
    if current and not old:  # a fresh plan: prefer the order that leaves placed workers in place
        in_place = keep_in_place([s.workers for s in result.stages], current, index)
        if in_place is not None:
            cost, stages_ = evaluate(in_place, devices, net, shape, work, polish=True)
            stall = lambda st: move_cost_s(_as_old(current, index), st, horizon.layer_load_s, horizon.reload_s)  # noqa: E731
            if stages_ is not None and (cost - result_s) * horizon.steps <= stall(result_stages) - stall(stages_):
                result_stages, result_s = stages_, cost
    chosen = [StagePlan(s.start, s.end, tuple(candidates[i].id for i in s.workers)) for s in result_stages]
    return PlanDecision(chosen, result_s, standby, *_moved(current, chosen), backstop_hit=result.backstop_hit)


def predict_plans_s(run: RunConfig, shape: ModelShape, plans: list[list[StagePlan]], pool: list[WorkerView],
                    measured: dict[tuple[str, str], Link], sites: SiteMap | None = None) -> list[float]:
    """Each of `plans`' predicted seconds per step with today's figures: its workers' rates (those of
    `pool`; others are left out) and their links, measured or their sites' typical ones (`sites`,
    else found from `measured`: measured_pairs of `pool`). inf when a stage has nobody or the stage
    count is out of bounds. One network for all of them."""
    used = {w for candidate in plans for s in candidate for w in s.workers}
    workers = [w for w in pool if w.id in used]
    index = {w.id: i for i, w in enumerate(workers)}
    net = _network(workers, measured, run.scheduler, sites)
    devices, work, out = _devices(workers), workload(run), []
    for candidate in plans:
        old = _as_old(candidate, index)
        if not old or len(old) not in run.pipeline.stage_counts or not all(s.workers for s in old):
            out.append(float("inf"))
        else:
            out.append(predict_step(old, devices, net, shape, work).step_s)
    return out


def _as_old(current: list[StagePlan], index: dict[str, int]) -> list[StagePlacement]:
    return [StagePlacement(s.start, s.end, tuple(index[w] for w in s.workers if w in index)) for s in current]


def _moved(current: list[StagePlan] | None, new: list[StagePlan]) -> tuple[int, int]:
    """(layers_moved, stall_layers) from `current` to `new`."""
    if not current:
        return 0, 0
    ids = sorted({w for s in [*current, *new] for w in s.workers})
    index = {w: i for i, w in enumerate(ids)}
    as_placement = lambda plan_: [StagePlacement(s.start, s.end, tuple(index[w] for w in s.workers))  # noqa: E731
                                  for s in plan_]
    before, after = as_placement(current), as_placement(new)
    return layers_moved(before, after), move_stall_layers(before, after)
