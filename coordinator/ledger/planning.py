"""The stage plan: which layers each stage holds and which workers hold them.

Asks the pure scheduler (coordinator/scheduler.py) for a plan from the live workers'
measurements, and applies it only where that loses nothing:
- before the run's first step opens: freely (workers load the initial weights, or the store's
  step when the run resumed from it, for whatever range they are given);
- at a restore point (recovery.py: a vacated stage, or the store completing the current step
  while a better plan is pending): every stage reloads its new range from the store;
- otherwise a re-plan that would move a worker that holds state is kept pending. A plan that
  only adds newcomers to groups whose ranges stay the same applies at once: they copy the
  state from a replica like any joiner.
Hysteresis (plan_horizon.py) keeps the current plan unless the predicted saving over the steps
ahead outweighs its moves' stall (a measured reload: replan_stall.py), and once a plan could start
(start_with_replicas a stage) a slower one never replaces it. A pending plan is priced again at
every search (scheduler._proposed) until it applies or a search prefers another. Between searches
a short stage takes the standby worker the cost model prices best (vacancy_choice.py), once a
search's plan has applied; with placement "even", standby workers fill vacancies in join order.
"""

from __future__ import annotations

import json
import math
from typing import Callable

from gptjt_core.config import RunConfig
from gptjt_core.stage_spec import StageSpec

from ..cost_model import ModelShape
from ..plan_horizon import Horizon
from ..scheduler import DecisionMemo, LinkView, PlanDecision, StagePlan, WorkerView, decide, fits_stage, too_small
from ..vacancy_choice import SPARE_COPY, ReplicaPricer
from .db import LedgerDB
from .events import EventLog
from .measurements import Measurements
from .replan_stall import ReplanStall
from .step_state import StepState
from .worker_views import LazyPricer, worker_view
from .workers import WorkerRegistry


class StagePlanner:
    """The plan in force, the scheduler's next one, and when a new one may apply."""

    def __init__(self, db: LedgerDB, events: EventLog, workers: WorkerRegistry, measurements: Measurements,
                 state: StepState, run: RunConfig, shape: ModelShape | None, default: list[StageSpec]):
        self.db, self.events, self.workers, self.measurements, self.state = db, events, workers, measurements, state
        self.run, self.shape, self.n_layer = run, shape, default[-1].end
        self.plan = self._stored(default)
        self.memo = DecisionMemo()  # a join or death that changes nothing a search sees costs no search
        self.stall = ReplanStall(db, events, run.scheduler)  # what a checkpoint re-plan's reloads cost
        # stage -> (every stage's workers, when): a stage with replicas that every standby worker
        # would slow is priced again only once its plan changes or scheduler.replan_every_s passed
        # (a swarm of thousands measures links many times a second, and each measurement fills;
        # a worker that joins meanwhile is placed by the merged search its join asked for)
        self.passed_at: dict[int, tuple[tuple, float]] = {}

    # -- the plan in force -------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the plan from the ledger (another connection may have re-planned)."""
        self.plan = self._stored(self.plan)

    def _stored(self, default: list[StageSpec]) -> list[StageSpec]:
        raw = self.db.meta("plan")
        return list(default) if raw is None else [StageSpec(a, b, embed=a == 0, head=b == self.n_layer)
                                                  for a, b in json.loads(raw)]

    def save(self, specs: list[StageSpec]) -> None:
        self.plan = list(specs)
        self.db.set_json_meta("plan", [[s.start, s.end] for s in specs])

    def scheduling(self) -> bool:
        return self.run.scheduler.placement == "cost-model" and self.shape is not None

    @property
    def pending(self) -> str:
        """Why a better plan waits for a restore point ("" if none, and once the run has no step left
        for it to run on: moving layers then would only make the final states ones no closed step
        attested; a restart with more --steps brings it back, to apply at the next checkpoint)."""
        return (self.db.meta("pending_plan") or "") if self._steps_left() else ""

    def _steps_left(self) -> bool:
        return self.state.step < self.run.train.steps

    # -- the scheduler's inputs --------------------------------------------------------
    def _views(self) -> list[WorkerView]:
        """Live workers that may hold a stage (a draining one is leaving; one held out after an
        averaging fallback sits out)."""
        held, averaging = self.state.held_out(), self.measurements.averaging_gbps()
        return [worker_view(r, averaging.get(r["id"], math.inf))
                for r in self.workers.live(("loading", "ready", "standby")) if r["id"] not in held]

    def _fits(self, row, spec: StageSpec) -> bool:
        """Can this worker hold the whole stage `spec` (scheduler.fits_stage)?"""
        return fits_stage(self.run, self.shape, worker_view(row), spec)

    def _link_views(self) -> list[LinkView]:
        return self.measurements.link_views()

    def _current_plan(self) -> list[StagePlan]:
        live = self.workers.stage_workers()
        return [StagePlan(s.start, s.end, tuple(w["id"] for w in live.get(i, []) if w["state"] != "draining"))
                for i, s in enumerate(self.plan)]

    def _free_to_replan(self) -> bool:
        """Before the first step opens nobody holds trained state: any range can be loaded."""
        return self.state.step_opened is None

    def _could_start(self, current: list[StagePlan]) -> bool:
        """Could the plan in force run a step (an applied plan, start_with_replicas a stage)? It is
        kept over a slower search then, before the first step too: bench churn saw re-plans after
        departures move 130-220 layers each, twelve of them before the first step."""
        start = self.run.pipeline.start_with_replicas
        return self.db.meta("last_replan") is not None and all(len(s.workers) >= start for s in current)

    def pending_stages(self) -> list[StagePlan]:
        """The pending plan's stages (empty if none): priced again at each search (scheduler._proposed)."""
        return [StagePlan(a, b, tuple(ws)) for a, b, ws in self.db.json_meta("pending_stages", [])]

    def _set_pending(self, why: str, decision: PlanDecision | None = None) -> None:
        self.db.set_meta("pending_plan", why)
        self.db.set_json_meta("pending_stages", [[s.start, s.end, list(s.workers)] for s in decision.stages]
                              if decision is not None else [])

    # -- deciding ----------------------------------------------------------------------
    def _decide(self, at_restore: bool = False) -> PlanDecision | None:
        current, cut_short, free = self._current_plan(), self.memo.backstop_hits, self._free_to_replan()
        # after the first step opened the steps left cap the horizon and a holder's reload costs the
        # last one's (not at a restore); before it, moves overlap the first loads (full horizon)
        horizon = Horizon.of(self.run.scheduler, None if free else self.run.train.steps - self.state.step,
                             0.0 if at_restore or free else self.stall.reload_s())
        decision = decide(self.run, self.shape, self._views(), self._link_views(),
                          current if any(s.workers for s in current) else None, self.memo,
                          keep_if_faster=not free or self._could_start(current),
                          proposals=(self.pending_stages(),), horizon=horizon)
        if self.memo.backstop_hits > cut_short:
            self.events.record("plan_search_cut_short", "the placement search hit scheduler.search_budget_s before "
                               "scoring search_evaluations candidates: this plan depends on how busy the "
                               "coordinator's host was (give it a core, or raise search_budget_s)")
        # who measures links next (Measurements.to_measure): the candidates, or everyone while no plan fits
        self.db.set_json_meta("link_candidates", list(decision.candidates) if decision is not None else [])
        if decision is not None:
            self.db.set_json_meta("standby_why", decision.standby)
            if decision.current_step_s < float("inf"):  # the plan in force, with today's figures
                self.db.set_meta("predicted_step_s", decision.current_step_s)
        return decision

    def replan(self, why: str) -> None:
        """A join, a leave or a new measurement: re-solve, and apply what is safe now (or, within
        scheduler.replan_every_s of the last search, leave it to replan_if_due)."""
        if not self.scheduling():
            self.fill_vacancies()
            return
        if self._searched_recently():
            if not self.replan_due:
                self.db.set_meta("replan_due", why)
            self.fill_vacancies(check_fit=True)
            return
        self.db.set_meta("replan_due", "")
        self.db.set_meta("last_search_at", self.db.clock())
        decision = self._decide()
        if decision is None:  # too few workers for the stages: fill what can be filled
            unfit = too_small(self.run, self.shape, self._views())
            self.db.set_json_meta("standby_why", unfit)
            self.fill_vacancies(exclude=frozenset(unfit))
            return
        if self._free_to_replan():
            self.apply(decision, why)
            return
        current = {w: i for i, s in enumerate(self._current_plan()) for w in s.workers}
        new = {w: i for i, s in enumerate(decision.stages) for w in s.workers}
        same_ranges = [(s.start, s.end) for s in decision.stages] == [(s.start, s.end) for s in self.plan]
        moves_holder = any(new.get(w) != i for w, i in current.items())
        if same_ranges and not moves_holder:
            if any(w not in current for w in new):
                self.apply(decision, why)  # newcomers only: they copy from a replica
            self._set_pending("")
        elif (decision.layers_moved or not same_ranges) and self._steps_left():  # (ranges that only shrink
            # move no layer, yet the pipeline's cuts change: that too waits for the checkpoint)
            if not self.pending:
                moves = f"moves {decision.layers_moved} layer(s)" if decision.layers_moved else "only shrinks ranges"
                self.events.record("replan_pending", f"{why}: a plan predicted at {decision.predicted_step_s:.3g} "
                                   f"s/step (now {decision.current_step_s:.3g} s) {moves}; it applies at the next "
                                   "complete checkpoint, where every stage reloads")
            self._set_pending(why, decision)
        # a stage left empty still takes a standby worker now (one that fits a layer)
        self.fill_vacancies(check_fit=True)

    @property
    def replan_due(self) -> str:
        """Why a re-plan waits for scheduler.replan_every_s to pass ("" if none does)."""
        return self.db.meta("replan_due") or ""

    def _searched_recently(self) -> bool:
        """Did the last search run less than scheduler.replan_every_s ago? The window is
        [last, last + every) as the simulation schedules it (not now - last < every, which float
        rounding can leave open at last + every); with every = 0, or a clock that stepped back
        past the last search, nothing waits."""
        every, last = self._search_window_s(), self.db.meta("last_search_at")
        return every > 0 and last is not None and float(last) <= self.db.clock() < float(last) + every

    def _search_window_s(self) -> float:
        """scheduler.replan_every_s; once the first step has opened, replan_every_running_s when set."""
        cfg = self.run.scheduler
        running = cfg.replan_every_running_s > 0 and not self._free_to_replan()
        return cfg.replan_every_running_s if running else cfg.replan_every_s

    def merged_search_at(self) -> float | None:
        """When the merged re-plan waiting in replan_due may run (the reaper's first pass from
        then runs it); None when none waits."""
        last = self.db.meta("last_search_at")
        return float(last) + self._search_window_s() if self.replan_due and last is not None else None

    def replan_if_due(self) -> bool:
        """Run the re-plan merged from requests that came too soon, once its time has come
        (the reaper calls this, inside its transaction); True if it ran. A search that raises
        is undone alone and not retried on every reaper pass: the plan in force stays, an event
        says why, and the next join, leave or measurement searches again."""
        why = self.replan_due
        if not why or self._searched_recently():
            return False
        try:
            with self.db.savepoint("merged_replan"):
                self.replan(f"{why} (and what came within scheduler.replan_every_s of it)")
        except Exception as e:  # the reaper's other duties (deaths, opening a step) must go on
            self.reload()  # apply() may have saved a plan in memory that the savepoint undid
            self.db.set_meta("replan_due", "")
            self.events.record("replan_failed", f"the merged re-plan ({why}) failed: {e!r}; the plan in force "
                               "stays, and the next join, leave or measurement searches again")
            return False
        return True

    def replan_at_restore(self, store_complete: bool, why: str) -> None:
        """Every stage reloads anyway (a vacated stage): apply the best plan if the store (or the
        initial weights) can serve any layer range then."""
        self.stall.interrupted(why)  # a checkpoint re-plan's reload being timed now times a failure too
        if not self.scheduling() or (self.state.restore_from_store and not store_complete):
            return  # (the store cannot serve new ranges at this step: keep the layout)
        decision = self._decide(at_restore=True)
        if decision is not None:
            self.apply(decision, why, restore=True)
        self._set_pending("")

    def pending_decision(self) -> PlanDecision | None:
        """At the complete checkpoint a pending plan waited for: the best plan now (its reload
        charged: only applying it makes the stages reload), or None if that is the plan in force
        (measurements since, or fewer steps left, no longer pay back a move): nothing reloads then."""
        why, decision = self.pending, self._decide()
        self._set_pending("")
        if decision is not None and self._changes(decision):
            return decision
        self.events.record("replan_dropped", f"{why}: the plan in force stays at the checkpoint of step {self.state.step}"
                           " (the steps left or measurements since no longer pay back a move); nothing reloads")
        return None

    def _changes(self, decision: PlanDecision) -> bool:
        """Would applying `decision` move a live worker or change a stage's range?"""
        new = {w: i for i, s in enumerate(decision.stages) for w in s.workers}
        return [(s.start, s.end) for s in decision.stages] != [(s.start, s.end) for s in self.plan] or any(
            new.get(r["id"], -1) != r["stage"] for r in self.workers.live(("loading", "ready", "standby")))

    # -- applying ----------------------------------------------------------------------
    def apply(self, decision: PlanDecision, why: str, restore: bool = False) -> bool:
        """Put `decision` in force; True if any worker or range changed."""
        old_specs, new_specs = self.plan, [s.spec(self.n_layer) for s in decision.stages]
        new = {w: i for i, s in enumerate(decision.stages) for w in s.workers}
        members = self.state.members()
        moved, held_moved = [], False
        for r in self.workers.live(("loading", "ready", "standby")):
            stage = new.get(r["id"], -1)
            before = old_specs[r["stage"]] if r["stage"] >= 0 else None
            after = new_specs[stage] if stage >= 0 else None
            if stage == r["stage"] and before == after:
                continue
            self.workers.assign(r["id"], stage)
            if r["stage"] >= 0:
                held_moved = True
                if r["id"] in members.get(r["stage"], []):
                    members[r["stage"]].remove(r["id"])
            moved.append(f"{r['id']} {_where(r['stage'], before)} -> {_where(stage, after)}")
        self.state.set_members(members)
        ranges_changed = [(s.start, s.end) for s in new_specs] != [(s.start, s.end) for s in old_specs]
        self.save(new_specs)
        self.db.set_meta("predicted_step_s", decision.predicted_step_s)
        if not moved and not ranges_changed:
            return False
        self.state.bump_plan_version()
        if held_moved:
            # A worker that held (or was loading) a stage holds another now: its heartbeats report the
            # old epoch until it has reloaded, so the epoch moves on (unmoved workers keep their weights).
            self.state.bump_restore_epoch()
        record = {"why": why, "step": self.state.step, "at": self.db.clock(), "layers_moved": decision.layers_moved,
                  "predicted_step_s": decision.predicted_step_s, "workers_moved": len(moved),
                  "ranges": [[s.start, s.end] for s in new_specs], "at_restore": restore}
        self.db.set_json_meta("last_replan", record)
        self.db.set_meta("layers_moved_total", int(self.db.meta("layers_moved_total") or 0) + decision.layers_moved)
        self.events.record("replanned", f"{why}: layers {', '.join(f'{s.start}-{s.end}' for s in new_specs)}, "
                           f"predicted {decision.predicted_step_s:.3g} s/step, {decision.layers_moved} layer(s) "
                           f"moved; " + ("; ".join(moved) if moved else "no worker moves"))
        return True

    def fill_vacancies(self, exclude: frozenset[str] = frozenset(), check_fit: bool = False) -> None:
        """Standby workers take stages: empty stages first, then the stage with the fewest
        replicas, up to pipeline.replicas_per_stage each. `exclude`: workers the scheduler found
        too small for any layer; check_fit: skip those whose memory cannot hold the stage. Under
        the cost-model placement, once a search's plan applied, the worker is the one the cost
        model prices best for the stage (coordinator/vacancy_choice.py; a stage with replicas may
        decline them all), else the longest-waiting one."""
        target = self.run.pipeline.replicas_per_stage
        exclude = exclude | frozenset(self.state.held_out())  # set aside by an averaging fallback
        taken = self.workers.stage_workers()
        passed: set[int] = set()  # stages no standby worker fits, or (cost model) each would slow
        # Until a search's plan has applied (the first joins, before links are measured), join order
        # costs nothing and starts loads early: that search places everyone anew. After it, a far
        # filler makes the plan in force look 2-3x slower and the next search moves most layers
        # (bench churn, before the first step: twelve re-plans of 130-220 layers each)
        planned = self.db.meta("last_replan") is not None
        pricer = None
        if self.scheduling() and (planned or not self._free_to_replan()):
            pricer = LazyPricer(lambda: ReplicaPricer(self.run, self.shape, self._views(), self._link_views()))
        standby = None  # read at the first short stage, then kept up to date here
        while True:
            counts = {s: len(taken.get(s, [])) for s in range(len(self.plan))}
            short = [s for s, n in counts.items() if n < target and s not in passed]
            if not short:
                return
            stage = min(short, key=lambda s: (counts[s], s))

            def fits(r, spec=self.plan[stage]) -> bool:
                return r["id"] not in exclude and (not check_fit or self._fits(r, spec))

            standby = self.workers.standby() if standby is None else standby
            if pricer is not None and standby:
                row = self._priced_pick(pricer, stage, taken, standby, fits)
            else:
                row = next((r for r in standby if fits(r)), None)
            if row is None and counts[stage] == 0:
                row = self._surplus_replica(taken, lambda r: not check_fit or self._fits(r, self.plan[stage]))
            if row is None:
                passed.add(stage)
                continue
            self.workers.assign(row["id"], stage)
            standby = [r for r in standby if r["id"] != row["id"]]
            taken.setdefault(stage, []).append(row)
            self.state.bump_plan_version()
            spec = self.plan[stage]
            role = "replica %d of " % (counts[stage] + 1) if counts[stage] else ""
            self.events.record("stage_assigned", f"{role}stage {stage} (layers {spec.start}-{spec.end}) -> {row['id']}")

    def _priced_pick(self, pricer: LazyPricer, stage: int, taken: dict, standby: list,
                     fits: Callable[[object], bool]):
        """The standby row the cost model prices best for `stage` (None: none fits, or each would
        slow the step); `taken`: stage -> its rows, this pass's assignments included."""
        key, now = tuple(tuple(r["id"] for r in taken.get(i, [])) for i in range(len(self.plan))), self.db.clock()
        seen = self.passed_at.get(stage)
        if seen is not None and seen[0] == key and now < seen[1] + self.run.scheduler.replan_every_s:
            return None  # every standby worker would have slowed this plan a moment ago
        rows = {r["id"]: r for r in standby}
        plan = [StagePlan(s.start, s.end, tuple(r["id"] for r in taken.get(i, []) if r["state"] != "draining"))
                for i, s in enumerate(self.plan)]
        averaging = self.measurements.averaging_gbps()
        views = [worker_view(r, averaging.get(r["id"], math.inf)) for r in standby]
        chosen = pricer.get().choose(plan, stage, views, lambda v: fits(rows[v.id]))
        if chosen is None:
            if len(taken.get(stage, [])) >= SPARE_COPY:  # declined for its cost, not for want of a fit
                self.passed_at[stage] = (key, now)
            return None
        return rows[chosen.id]

    def _surplus_replica(self, taken: dict, fits: Callable[[object], bool]) -> object | None:
        """An empty stage with nobody on standby takes the newest replica that `fits` it from the
        stage that has the most (if it has more than one); that stage goes on with the others."""
        donor = max(taken, key=lambda s: (len(taken[s]), -s), default=None)
        if donor is None or len(taken[donor]) < 2:
            return None
        # newest first: the oldest replicas are the likeliest to stay
        row = next((r for r in reversed(taken[donor]) if fits(r)), None)
        if row is None:
            return None
        taken[donor].remove(row)
        members = self.state.members()
        if row["id"] in members.get(donor, []):
            members[donor].remove(row["id"])
            self.state.set_members(members)
        self.events.record("replica_moved", f"{row['id']} leaves stage {donor} (it has {len(taken[donor])} other "
                           "replica(s)) for a stage that has none")
        return row

    # -- reporting ---------------------------------------------------------------------
    def link_candidates(self) -> frozenset[str]:
        """The workers the last search could place (empty: no search yet, or too few for a plan)."""
        return frozenset(self.db.shared_json_meta("link_candidates", []))

    def standby_reasons(self) -> dict[str, str]:
        """worker id -> why it has no stage (shared: never change it)."""
        return self.db.shared_json_meta("standby_why", {})


def _where(stage: int, spec: StageSpec | None) -> str:
    return f"stage {stage} ({spec.start}-{spec.end})" if spec is not None else "standby"
