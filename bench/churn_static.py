"""The static-restart baseline of bench churn: what a DT-FM-style static pipeline does with the
same volunteers.

Its plan is made once, at the start, and never changes: any placed worker's departure stops
the whole pipeline; once the death is noticed (peer_detect_s) the run goes back to its last
checkpoint, the leaver's place (same layers, same group) goes to the fastest volunteer on
standby that can hold them (or the next to join, if none can), and every stage reloads from the
store before steps resume. Standby volunteers otherwise wait.

The same as the simulation of our coordinator (bench/churn_sim.py): the volunteers and their
sessions (Arrivals with the same seed; departures are processed in time order and each draws
its newcomer, so the sessions are identical), the cost model on the same links, the
coordinator's own placement search for the first plan (coordinator/placement.py, the fastest
max_stages x replicas_per_stage volunteers that fit, as coordinator/scheduler.py picks them),
the checkpoint cadence and the upload and load times. What differs is only the policy, and
that this baseline is computed directly rather than through the ledger.
"""

from __future__ import annotations

import heapq
import itertools
import math

from coordinator.cost_model import Device, ModelShape, StagePlacement, infeasible, predict_step, stage_params
from coordinator.placement import plan, usable
from coordinator.scheduler import workload

from .churn_settings import ChurnResult, ChurnSettings, run_config
from .churn_volunteers import Arrivals, Regions, Volunteer


class StaticRestart:
    """One run of the static-restart policy; run() returns a ChurnResult (the fields it has)."""

    def __init__(self, settings: ChurnSettings):
        self.s, self.regions = settings, Regions()
        self.net = self.regions.network()
        self.run = run_config(settings)
        self.shape, self.work = ModelShape.gptj_6b(), workload(self.run)
        self.arrivals = Arrivals(settings.workers, settings.median_session_s, settings.session_shape,
                                 settings.seed, self.regions, churn=settings.churn, rejoin_s=settings.rejoin_s)
        self.end = settings.hours * 3600
        self.alive: dict[str, Volunteer] = {}
        self.events: list = []  # (time, order, kind, volunteer)
        self.order = itertools.count()
        self.result = ChurnResult()

    def _at(self, t: float, kind: str, v: Volunteer) -> None:
        heapq.heappush(self.events, (t, next(self.order), kind, v))

    def _device(self, v: Volunteer) -> Device:
        return Device(v.name, v.tflops, v.device.memory_gb, v.site)

    def _first_plan(self) -> tuple[list[StagePlacement], list[Volunteer]]:
        everyone = sorted(self.alive.values(), key=lambda v: (-v.tflops, v.name))
        fits, _ = usable([self._device(v) for v in everyone], self.shape, self.work)
        p = self.run.pipeline
        chosen = [everyone[i] for i in fits][:max(p.stage_counts) * p.replicas_per_stage]
        found = plan([self._device(v) for v in chosen], self.net, self.shape, self.work, stage_counts=p.stage_counts,
                     evaluations=self.run.scheduler.search_evaluations, backstop_s=self.run.scheduler.search_budget_s,
                     max_group=p.replicas_per_stage, keep_workers=True)
        used = sorted({i for st in found.stages for i in st.workers})  # the search may leave some out
        index = {i: k for k, i in enumerate(used)}
        return ([StagePlacement(st.start, st.end, tuple(index[i] for i in st.workers)) for st in found.stages],
                [chosen[i] for i in used])

    def _step_s(self, stages: list[StagePlacement], placed: list[Volunteer]) -> float:
        return predict_step(stages, [self._device(v) for v in placed], self.net, self.shape, self.work).step_s

    def _stage_bytes(self, st: StagePlacement) -> float:
        return stage_params(self.shape, st.start, st.end) * self.s.checkpoint_bytes_per_param

    def _transfer_s(self, st: StagePlacement, v: Volunteer) -> float:
        """One stage's checkpoint between volunteer v and the store (upload or load)."""
        return self._stage_bytes(st) * 8 / (self.net.site_link(v.site, self.regions.store_site).gbps * 1e9)

    def _reload_s(self, stages: list[StagePlacement], placed: list[Volunteer]) -> float:
        return max(self._transfer_s(st, placed[i]) for st in stages for i in st.workers)

    def _replacement(self, st: StagePlacement, placed: list[Volunteer]) -> Volunteer | None:
        """The fastest standby volunteer that can hold this stage's layers."""
        taken = {v.name for v in placed}
        for v in sorted(self.alive.values(), key=lambda v: (-v.tflops, v.name)):
            if v.name not in taken and self._fits(v, st):
                return v
        return None

    def _fits(self, v: Volunteer, st: StagePlacement) -> bool:
        return not infeasible([StagePlacement(st.start, st.end, (0,))], [self._device(v)], self.shape, self.work)

    def _admit(self, t: float) -> None:
        """Joins and departures up to t (never past the end): the volunteers alive at t (each
        departure draws its newcomer)."""
        t = min(t, self.end)
        while self.events and self.events[0][0] <= t:
            when, _, kind, v = heapq.heappop(self.events)
            if kind == "join":
                self.alive[v.name] = v
                if math.isfinite(v.leave_s):
                    self._at(v.leave_s, "leave", v)
            else:
                self.alive.pop(v.name, None)
                self.result.departures += 1
                newcomer = self.arrivals.replacement(when)
                self._at(newcomer.join_s, "join", newcomer)

    def run_sim(self) -> ChurnResult:
        for v in self.arrivals.initial:
            self._at(v.join_s, "join", v)
        started = max(v.join_s for v in self.arrivals.initial)  # the plan is made once all have joined
        self._admit(started)
        stages, placed = self._first_plan()
        t = started + self._reload_s(stages, placed)  # every stage loads the initial weights
        step, saved = 0, 0
        useful = {}  # step -> seconds it took, for steps kept
        every = self.run.train.checkpoint_every
        while t < self.end:
            seconds = self._step_s(stages, placed)
            if (step + 1) % every == 0:
                seconds += max(self._transfer_s(st, placed[i]) for st in stages for i in st.workers[:1])
            leaving = min((v.leave_s for v in placed), default=math.inf)
            if t + seconds <= min(leaving, self.end):
                t += seconds
                useful[step] = seconds
                step += 1
                saved = step if step % every == 0 else saved
                self._admit(t)
                continue
            if leaving >= self.end:
                self.result.unfinished_s += self.end - t  # the step in progress when time ran out
                break
            # A placed worker left mid-step: the run restarts from the last checkpoint without it.
            # (One that left while the stages reloaded is noticed as they finish.)
            noticed = max(leaving, t) + self.s.peer_detect_s
            self.result.rolled_back_s += noticed - t + sum(useful.pop(s) for s in range(saved, step))
            self.result.rollbacks += 1
            t, step = noticed, saved
            self._admit(t)
            t = self._replace_leavers(stages, placed, t)
            t += self._reload_s(stages, placed)
            self._admit(t)
        self._admit(self.end)
        r = self.result
        r.steps, r.seconds = step, self.end
        r.useful_s = sum(useful.values())
        r.tokens_per_s = step * self.run.train.global_batch * self.run.train.seq_len / self.end
        return r

    def _replace_leavers(self, stages: list[StagePlacement], placed: list[Volunteer], t: float) -> float:
        """Every placed volunteer no longer alive gets a successor (waiting for joins if needed);
        returns the time the last one was found."""
        for i, v in enumerate(placed):
            if v.name in self.alive:
                continue
            stage = next(st for st in stages if i in st.workers)
            while (new := self._replacement(stage, placed)) is None and self.events and self.events[0][0] <= self.end:
                t = self.events[0][0]
                self._admit(t)
            if new is None:
                return math.inf
            placed[i] = new
            self.result.placed_departures += 1  # (every leaver since the last restart, not the restarts)
        return t


def simulate_static(settings: ChurnSettings) -> ChurnResult:
    return StaticRestart(settings).run_sim()
