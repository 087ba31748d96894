"""Who volunteers in the churn simulation (bench/churn_sim.py): their GPUs, where they sit, how
long they stay.

Devices: a volunteer mix of consumer and retired datacenter cards. The rate a stage gets from a
card is its dense fp16/bf16 tensor-core peak (NVIDIA's datasheets; the consumer cards' figure is
with fp32 accumulation, what training uses) times MFU = 0.45, the share of peak a GPT-J block
reaches in practice (the figure bench/scheduler.py uses for its A100s).

Sites: DT-FM's measured cloud regions (data/network_scenarios.json, "links": one-way latency
and bandwidth between regions, "intra_region" inside one). Each volunteer sits in a region
drawn uniformly; its link to the checkpoint store (in the first region) is the region pair's.

Sessions: how long a volunteer stays is heavy-tailed. Measurements of volunteer hosts find
availability intervals far from exponential and fit best by Weibull or log-normal laws with a
shape below 1 (Nurmi, Brevik, Wolski, "Modeling machine availability in enterprise and
wide-area distributed computing environments", Euro-Par 2005; Javadi, Kondo, Vincent, Anderson,
"Discovering statistical models of availability in large distributed systems: an empirical
study of SETI@home", MASCOTS 2009). We draw Weibull sessions of shape 0.5 (many short
sessions, a long tail of hosts that stay for days) scaled to the configured median: the mean
is then 2 / (ln 2)^2, about 4.2 times the median.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from coordinator.cost_model import Link, Network

SCENARIOS = Path(__file__).resolve().parent.parent / "data" / "network_scenarios.json"
MFU = 0.45  # share of the tensor-core peak a GPT-J block reaches


@dataclass(frozen=True)
class DeviceClass:
    """One kind of volunteer GPU: its memory (GB), datasheet peak (dense fp16/bf16 tensor
    TFLOP/s) and its share of the volunteers."""
    name: str
    memory_gb: float
    peak_tflops: float
    share: float

    @property
    def tflops(self) -> float:
        """What a GPT-J block gets from it (TFLOP/s)."""
        return self.peak_tflops * MFU


# Shares: a guess at a 2026 volunteer pool (gamers' cards most, some retired datacenter cards);
# the bench reports them with its figures. A 16 GB card holds no GPT-J 6B stage with the run's
# micro-batches in flight: those volunteers wait on standby (the scheduler says why).
VOLUNTEER_MIX = (
    DeviceClass("RTX 3090", 24.0, 71.0, 0.30),
    DeviceClass("RTX 4090", 24.0, 165.2, 0.25),
    DeviceClass("A100 80GB", 80.0, 312.0, 0.10),
    DeviceClass("V100 32GB", 32.0, 125.0, 0.10),
    DeviceClass("T4", 16.0, 65.0, 0.25),
)


@dataclass(frozen=True)
class Volunteer:
    """One session of one volunteer: it joins at join_s and vanishes at leave_s (virtual seconds).
    speed: its card's rate over its class's (clocks, cooling and drivers differ, by up to 5 %
    either way). It also keeps the scheduler's ties between identical cards from being broken by
    the ledger's random worker ids, so a seed gives the same plans run after run."""
    name: str
    device: DeviceClass
    site: str
    join_s: float
    leave_s: float
    speed: float = 1.0

    @property
    def tflops(self) -> float:
        return self.device.tflops * self.speed


class Regions:
    """The sites volunteers sit in, and the links between them (DT-FM's measurements)."""

    def __init__(self, path: Path = SCENARIOS):
        data = json.loads(path.read_text())
        inside = data["intra_region"]
        self.inside = Link(inside["latency_ms"] / 1e3, inside["bandwidth_gbps"])
        self.between = {(l["a"], l["b"]): Link(l["latency_ms"] / 1e3, l["bandwidth_gbps"]) for l in data["links"]}
        self.names = sorted({site for pair in self.between for site in pair})
        self.store_site = self.names[0]

    def network(self) -> Network:
        return Network(self.between, inside=self.inside)

    def link(self, a: str, b: str) -> Link:
        return self.network().site_link(a, b)


def weibull_session_s(rng: random.Random, median_s: float, shape: float) -> float:
    """A session length (s) from a Weibull law of this shape whose median is median_s."""
    scale = median_s / math.log(2) ** (1 / shape)
    return rng.weibullvariate(scale, shape)


class Arrivals:
    """The stream of volunteer sessions: `workers` join at the start, and each departure brings a
    newcomer `rejoin_s` later on average (exponential), so the swarm stays near its size.
    churn=False: nobody ever leaves (the no-churn ceiling)."""

    def __init__(self, workers: int, median_s: float, shape: float, seed: int, regions: Regions,
                 churn: bool = True, rejoin_s: float = 60.0):
        self.rng = random.Random(seed)
        self.median_s, self.shape, self.churn, self.rejoin_s = median_s, shape, churn, rejoin_s
        self.regions, self.count = regions, 0
        # 10 ms apart: the ledger orders workers by join time, and a tie would be broken by its
        # random worker ids (plans would then differ from run to run)
        self.initial = [self._session(i * 0.01) for i in range(workers)]

    def _session(self, join_s: float) -> Volunteer:
        rng = self.rng
        device = rng.choices(VOLUNTEER_MIX, weights=[d.share for d in VOLUNTEER_MIX])[0]
        stay = weibull_session_s(rng, self.median_s, self.shape) if self.churn else math.inf
        self.count += 1
        return Volunteer(f"v{self.count}", device, rng.choice(self.regions.names), join_s, join_s + stay,
                         rng.uniform(0.95, 1.05))

    def replacement(self, left_s: float) -> Volunteer:
        """The newcomer that follows a departure at left_s."""
        return self._session(left_s + self.rng.expovariate(1 / self.rejoin_s))
