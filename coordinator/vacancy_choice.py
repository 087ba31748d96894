"""Which standby worker fills a stage short of replicas between plan searches, priced by the cost
model (coordinator/cost_model.py) on the links the workers measured.

A departure leaves a stage short, and the ledger fills it at once (a search may be minutes away
under scheduler.replan_every_s, and moves wait for a checkpoint). Taking the longest-waiting
standby worker, wherever it sits, made the churn simulation's steps 2-3x slower: one replica an
ocean away from its group sets the group's all-reduce and both neighbouring transfers to the
slowest link (cost_model.allreduce_s, transfer_s take a group's worst link). So:
- the candidates are, per site (coordinator/sites.py: found from measured latencies), its
  fastest standby worker (the longest-waiting among equals), so a swarm of thousands of standby
  workers costs a few predictions, not thousands;
- a worker that has measured no link yet cannot be priced (it would take the optimistic
  scheduler.default_link_*): it is a candidate only when no measured one fits, and only for a
  stage with fewer than two replicas;
- the one whose joining gives the fastest predicted step wins; a stage that has replicas takes
  it only if the step is then faster than without it (a far replica can cost more than the
  micro-batches it adds); a stage with fewer than two takes the best there is (with one copy of
  its state, its holder's departure means a restore from the store).
Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gptjt_core.config import RunConfig

from .cost_model import ModelShape
from .scheduler import LinkView, StagePlan, WorkerView, measured_pairs, predict_plans_s
from .sites import SiteMap

SPARE_COPY = 2  # replicas a stage takes whatever they cost: its state then survives one departure


class ReplicaPricer:
    """Chooses standby workers for short stages, over one set of live workers and measured links
    (sites are found once for all the choices made on them)."""

    def __init__(self, run: RunConfig, shape: ModelShape, everyone: list[WorkerView], links: list[LinkView]):
        """everyone: the live workers (their measured links find the sites)."""
        self.run, self.shape, self.everyone = run, shape, everyone
        self.measured = measured_pairs(links, everyone)
        self.priced = {w for pair in self.measured for w in pair}  # workers with a measured link
        self.site_map = SiteMap.find([w.id for w in everyone], self.measured, run.scheduler.site_latency_ms)

    def choose(self, plan: list[StagePlan], stage: int, standby: list[WorkerView],
               fits: Callable[[WorkerView], bool]) -> WorkerView | None:
        """The worker of `standby` (in join order) that `stage` of `plan` should take next, or None
        when none should: none `fits` (can and may hold the stage), or the stage has replicas and
        each candidate would slow the step. `fits` is asked of few workers: per site, the
        fastest ones until one fits."""
        spare = len(plan[stage].workers) >= SPARE_COPY  # the stage can wait for a worker that pays off
        if not any(w.id in self.priced for w in standby):
            # nobody can be priced: the longest-waiting one, unless the stage can wait for measurements
            return None if spare else next((w for w in standby if fits(w)), None)
        order = {w.id: i for i, w in enumerate(standby)}
        best_per_site: dict[str, WorkerView] = {}
        # fastest first, the longest-waiting among equals: the first that fits is its site's candidate
        for w in sorted((w for w in standby if w.id in self.priced), key=lambda w: (-w.tflops, order[w.id])):
            site = self.site_map.sites.get(w.id, w.id)
            if site not in best_per_site and fits(w):
                best_per_site[site] = w
        if not best_per_site:
            return None if spare else next((w for w in standby if w.id not in self.priced and fits(w)), None)
        options = sorted(best_per_site.values(), key=lambda w: order[w.id])
        if any(not s.workers for i, s in enumerate(plan) if i != stage):
            # another stage is empty too, so there is no step to predict: the fastest candidate
            return max(options, key=lambda w: w.tflops)  # max keeps the first (longest-waiting) of equals
        trials = [[StagePlan(s.start, s.end, s.workers + ((w.id,) if i == stage else ())) for i, s in enumerate(plan)]
                  for w in options]
        known = {w.id for w in self.everyone}
        pool = self.everyone + [w for w in options if w.id not in known]
        *with_each, as_is = predict_plans_s(self.run, self.shape, trials + [plan], pool, self.measured,
                                          self.site_map)
        best_s, best = min(zip(with_each, options), key=lambda x: x[0])  # min keeps the first of equals
        if not spare:
            return best  # a second copy of the stage's state first: its holder's departure costs no restore then
        return None if as_is < math.inf and best_s >= as_is else best
