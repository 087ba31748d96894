"""bench scheduler: predicted step time of our placement vs random and round-robin placements
on the DT-FM network scenarios (../shared/data/network_scenarios.json), 64 workers.

Model and batch: GPT-J 6B at the recipe's batch (64 sequences of 2048 tokens a step, one
sequence per micro-batch), fp16 activations and fp16 gradient averaging at every step,
fp32 Adam states (16 bytes a parameter). Devices, alternating within each site: an
80 GB A100-class GPU (140 TFLOP/s effective: 312 bf16 peak x 45 %) and a 24 GB
consumer-class GPU (35 TFLOP/s effective). Random: the median of 10 random partitions into
equal groups with an even layer split; round-robin: worker i -> stage i mod S with an even
split, S being our plan's stage count. Our search runs at the coordinator's defaults
(SchedulerConfig: `search_evaluations` candidate layouts, `search_budget_s` the wall-clock
backstop, which must never bind: `backstop_hit` says if it did). best known: the best of
our plan and searches 10x as long (the evaluations and the backstop) from 4 other seeds;
with --quick 4x as long from 2. Churn: a scripted sequence of leaves and joins on the
worldwide scenario, re-planned with hysteresis (moves must pay back within 100 steps,
loading a layer costs 10 s) against a full re-plan from scratch.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from coordinator.cost_model import Device, Link, ModelShape, Network, Workload
from coordinator.placement import layers_moved, plan, random_placement, replan, round_robin_placement
from gptjt_core.config import SchedulerConfig

DESCRIPTION = "placement on DT-FM's network scenarios: predicted step vs random / round-robin, gap, plan time, churn"

# a copy of ../shared/data/network_scenarios.json (DT-FM's measured links), shipped with the repo
SCENARIOS = Path(__file__).resolve().parent.parent / "data" / "network_scenarios.json"
BIG, SMALL = (140.0, 80.0), (35.0, 24.0)  # (effective TFLOP/s, GB)
SEARCH = SchedulerConfig()  # the coordinator's defaults: the search the coordinator runs
BUDGET = {"evaluations": SEARCH.search_evaluations, "backstop_s": SEARCH.search_budget_s}
WORK = Workload(tokens_per_micro_batch=2048, micro_batches=64, in_flight=4, activation_bytes_per_value=2.0,
                gradient_bytes_per_param=2.0, state_bytes_per_param=16.0)


def _devices(sites: list[tuple[str, int]]) -> list[Device]:
    out = []
    for site, count in sites:
        for i in range(count):
            tflops, mem = BIG if i % 2 == 0 else SMALL
            out.append(Device(f"{site}-{i}", tflops, mem, site))
    return out


def _all_pairs(sites: list[str], link: Link) -> dict[tuple[str, str], Link]:
    return {(a, b): link for i, a in enumerate(sites) for b in sites[i + 1:]}


def scenarios(data: dict) -> dict[str, tuple[list[Device], Network]]:
    """The six scenarios of network_scenarios.json as devices and links."""
    ms = 1e-3
    table = {(x["a"], x["b"]): Link(x["latency_ms"] * ms, x["bandwidth_gbps"]) for x in data["links"]}
    intra = Link(data["intra_region"]["latency_ms"] * ms, data["intra_region"]["bandwidth_gbps"])
    machines = [f"m{i}" for i in range(8)]
    spot_sites = [f"s{i}" for i in range(8)] + [f"solo{i}" for i in range(32)]
    regional = {("Virginia", "Oregon"): (67, 1.15), ("Virginia", "California"): (59, 1.05),
                ("Virginia", "Ohio"): (11, 1.12), ("Oregon", "California"): (12, 1.25),
                ("Oregon", "Ohio"): (49, 1.10), ("California", "Ohio"): (52, 1.02)}
    world = ["Oregon", "Virginia", "Ohio", "Tokyo", "Seoul", "London", "Frankfurt", "Ireland"]
    return {
        "datacenter": (_devices([(m, 8) for m in machines]),
                       Network(_all_pairs(machines, Link(0.0, 3.125)), inside=Link(0.0, 100.0))),
        "spot_datacenter": (_devices([(s, 4) for s in spot_sites[:8]] + [(s, 1) for s in spot_sites[8:]]),
                            Network(_all_pairs(spot_sites, Link(0.0, 1.25)), inside=Link(0.0, 100.0))),
        "multi_university": (_devices([("Ohio", 32), ("Virginia", 32)]),
                             Network({("Ohio", "Virginia"): Link(11 * ms, 1.12)}, inside=Link(1 * ms, 5.0))),
        "regional": (_devices([(r, 16) for r in ("Virginia", "Oregon", "California", "Ohio")]),
                     Network({k: Link(v[0] * ms, v[1]) for k, v in regional.items()}, inside=intra)),
        "worldwide": (_devices([(r, 8) for r in world]),
                      Network({k: v for k, v in table.items() if k[0] in world and k[1] in world}, inside=intra)),
        "homogeneous_tc": (_devices([("tc", 64)]), Network({}, inside=Link(50 * ms, 1.0))),
    }


def _churn(devices: list[Device], net: Network, model: ModelShape, quick: bool) -> dict:
    rng = random.Random(1)
    current = plan(devices, net, model, WORK, **BUDGET).stages
    devices = list(devices)
    gone: set[int] = set()
    moved_hysteresis, moved_full = [], []
    sites = sorted({d.site for d in devices})
    for event in range(6 if quick else 12):
        if event % 2 == 0:  # a worker leaves
            gone.add(rng.choice([w for s in current for w in s.workers]))
        else:  # a new one joins
            tflops, mem = rng.choice([BIG, SMALL])
            devices.append(Device(f"joiner-{event}", tflops, mem, rng.choice(sites)))
        g = frozenset(gone)
        kept = replan(current, devices, net, model, WORK, seconds_per_layer_load=10.0, horizon_steps=100,
                      seed=event, gone=g, **BUDGET)
        fresh = plan(devices, net, model, WORK, seed=event, gone=g, **BUDGET)
        moved_hysteresis.append(layers_moved(current, kept.stages))
        moved_full.append(layers_moved(current, fresh.stages))
        current = kept.stages
    return {"layers_moved_per_churn_event": statistics.mean(moved_hysteresis),
            "layers_moved_per_churn_event_full_replan": statistics.mean(moved_full),
            "churn_events": len(moved_hysteresis)}


def run(quick: bool = False) -> dict:
    data = json.loads(SCENARIOS.read_text())
    model = ModelShape.gptj_6b()
    out: dict = {"workers": 64, "model": "gptj-6b", "global_batch": 64, "seq_len": 2048}
    for name, (devices, net) in scenarios(data).items():
        t0 = time.perf_counter()
        ours = plan(devices, net, model, WORK, **BUDGET)
        plan_ms = (time.perf_counter() - t0) * 1e3
        stages = len(ours.stages)
        rand = statistics.median(random_placement(devices, net, model, WORK, stages, random.Random(s)).step_s
                                 for s in range(10))
        robin = round_robin_placement(devices, net, model, WORK, stages).step_s
        longer = 4 if quick else 10
        long = min(plan(devices, net, model, WORK, evaluations=BUDGET["evaluations"] * longer,
                        backstop_s=BUDGET["backstop_s"] * longer, seed=s).step_s
                   for s in range(1, 3 if quick else 5))
        best = min(long, ours.step_s)
        out[name] = {"predicted_step_s": ours.step_s, "random_step_s": rand, "round_robin_step_s": robin,
                     "ratio_vs_random": rand / ours.step_s, "ratio_vs_round_robin": robin / ours.step_s,
                     "gap_vs_best_known": (ours.step_s - best) / best, "plan_ms": plan_ms, "stages": stages,
                     "evaluations": ours.evaluations, "backstop_hit": ours.backstop_hit,
                     "replicas": [len(s.workers) for s in ours.stages],
                     "layers": [s.end - s.start for s in ours.stages]}
    worldwide_devices, worldwide_net = scenarios(data)["worldwide"]
    out["worldwide"].update(_churn(worldwide_devices, worldwide_net, model, quick))
    out["ratio_vs_random"] = out["worldwide"]["ratio_vs_random"]
    out["gap_vs_best_known"] = max(v["gap_vs_best_known"] for v in out.values() if isinstance(v, dict))
    out["plan_ms"] = max(v["plan_ms"] for v in out.values() if isinstance(v, dict))
    out["backstop_hit"] = any(v["backstop_hit"] for v in out.values() if isinstance(v, dict))
    return out
