"""The ledger's stage plan: which layers each stage holds and which workers hold them.

A mixin of RunLedger (state.py), kept apart because it is one concept: asking the pure
scheduler (scheduler.py) for a plan from the live workers' measurements, and applying it
only where that loses nothing.

When a plan may change what a worker already holds:
- before the run's first step opens: freely (workers load the initial weights, or the
  store's step when the run resumed from it, for whatever range they are given);
- at a restore point: when a stage is vacated and every stage reloads anyway, or when the
  store completes the current step while a better plan is pending (the open step's partial
  work restarts, at most one step's worth, and every stage reloads its new range from the
  store at that step);
- otherwise a re-plan that would move a worker that holds state is kept pending. A plan that
  only adds newcomers to groups whose ranges stay the same applies at once: they copy the
  state from a replica like any joiner.
Hysteresis (placement.replan) keeps the current plan unless the predicted saving over
scheduler.horizon_steps steps outweighs the layers the move would load.
"""

from __future__ import annotations

import json
import statistics

from gptjt_core.model import StageSpec

from .scheduler import LinkView, PlanDecision, StagePlan, WorkerView, decide, too_small


class PlanningMixin:
    """Needs from RunLedger: db, run, plan, shape, clock, _meta, _set_meta, _event,
    stage_workers, _members, _set_members, _fill_vacancies, _is_complete, phase."""

    # -- reading -----------------------------------------------------------------------
    def _stored_plan(self, default: list[StageSpec]) -> list[StageSpec]:
        raw = self._meta("plan")
        if raw is None:
            return list(default)
        n_layer = default[-1].end
        return [StageSpec(a, b, embed=a == 0, head=b == n_layer) for a, b in json.loads(raw)]

    def _set_plan(self, specs: list[StageSpec]) -> None:
        self.plan = list(specs)
        self._set_meta("plan", json.dumps([[s.start, s.end] for s in specs]))

    def _scheduling(self) -> bool:
        return self.run.scheduler.placement == "cost-model" and self.shape is not None

    def _views(self) -> list[WorkerView]:
        """Live workers that may hold a stage (a draining one is leaving)."""
        views, held = [], self.held_out()  # replicas set aside by an averaging fallback sit out
        for r in self.db.execute("SELECT * FROM workers WHERE state IN ('loading', 'ready', 'standby') "
                                 "ORDER BY joined").fetchall():
            if r["id"] in held:
                continue
            device = json.loads(r["device"] or "{}")
            # One block of the run's model, measured, beats a square matmul's peak (see worker/probe.py)
            rate = device.get("block_tflops") or device.get("matmul_tflops", 0.0)
            views.append(WorkerView(r["id"], r["address"], float(rate),
                                    float(device.get("memory_bytes", 0)) / 1e9, r["stage"]))
        return views

    def _link_views(self) -> list[LinkView]:
        return [LinkView(r["src"], r["dst"], r["latency_ms"], r["mbit"])
                for r in self.db.execute("SELECT * FROM links").fetchall()]

    def _current_plan(self) -> list[StagePlan]:
        live = self.stage_workers()
        return [StagePlan(s.start, s.end, tuple(w["id"] for w in live.get(i, []) if w["state"] != "draining"))
                for i, s in enumerate(self.plan)]

    def _measured_workers(self) -> int:
        """Live workers whose device was measured at the run's dtype (reported after joining)."""
        return sum(1 for r in self.db.execute("SELECT device FROM workers WHERE state IN ('loading', 'ready', "
                                              "'standby')").fetchall()
                   if json.loads(r["device"] or "{}").get("at_run_dtype"))

    def _free_to_replan(self) -> bool:
        """Before the first step opens nobody holds trained state: any range can be loaded."""
        return self._meta("step_opened") is None

    # -- deciding ----------------------------------------------------------------------
    def _decide(self) -> PlanDecision | None:
        current = self._current_plan()
        decision = decide(self.run, self.shape, self._views(), self._link_views(),
                          current if any(s.workers for s in current) else None)
        if decision is not None:
            self._set_meta("standby_why", json.dumps(decision.standby))
            if decision.current_step_s < float("inf"):  # the plan in force, with today's figures
                self._set_meta("predicted_step_s", decision.current_step_s)
        return decision

    def _replan(self, why: str) -> None:
        """A join, a leave or a new measurement: re-solve, and apply what is safe now."""
        if not self._scheduling():
            self._fill_vacancies()
            return
        decision = self._decide()
        if decision is None:  # too few workers for the stages: fill what can be filled
            unfit = too_small(self.run, self.shape, self._views())
            self._set_meta("standby_why", json.dumps(unfit))
            self._fill_vacancies(exclude=frozenset(unfit))
            return
        if self._free_to_replan():
            self._apply_plan(decision, why)
            return
        current = {w: i for i, s in enumerate(self._current_plan()) for w in s.workers}
        new = {w: i for i, s in enumerate(decision.stages) for w in s.workers}
        same_ranges = [(s.start, s.end) for s in decision.stages] == [(s.start, s.end) for s in self.plan]
        moves_holder = any(new.get(w) != i for w, i in current.items())
        if same_ranges and not moves_holder:
            if any(w not in current for w in new):
                self._apply_plan(decision, why)  # newcomers only: they copy from a replica
            self._set_meta("pending_plan", "")
        elif decision.layers_moved:
            if not self._meta("pending_plan"):
                self._event("replan_pending", f"{why}: a plan predicted at {decision.predicted_step_s:.3g} s/step "
                            f"(now {decision.current_step_s:.3g} s) moves {decision.layers_moved} layer(s); it applies "
                            "at the next complete checkpoint")
            self._set_meta("pending_plan", why)
        # a stage left empty still takes a standby worker now (one that fits a layer)
        self._fill_vacancies(exclude=frozenset(too_small(self.run, self.shape, self._views())))

    def _replan_at_restore(self, target: int, why: str) -> None:
        """Every stage reloads at `target` anyway (a vacated stage, or a pending plan at a
        complete checkpoint): apply the best plan if the store (or the initial weights) can
        serve any layer range at that step."""
        if not self._scheduling():
            return
        if int(self._meta("restore_from_store") or 0) and not self._is_complete(target):
            return  # the store cannot serve new ranges at this step: keep the layout
        decision = self._decide()
        if decision is not None:
            self._apply_plan(decision, why, restore=True)
        self._set_meta("pending_plan", "")

    def _maybe_apply_pending(self, step: int) -> None:
        """The store just completed `step`: a pending plan applies if the run is at that step
        and no stage has applied it yet."""
        if (not self._meta("pending_plan") or step != self.step or self.phase not in ("waiting", "open")
                or not self._scheduling() or not self._is_complete(step)):
            return  # (a checkpoint of step + 1 lands while step is applying: the close calls again)
        why = self._meta("pending_plan")
        if self.phase == "open" and self._step_has_work():
            self._restart_step(f"re-plan at the checkpoint of step {step}")
        self._set_meta("restore_epoch", self.restore_epoch + 1)
        self._set_meta("restore_step", step)
        self._set_meta("restore_from_store", 1)
        self._set_phase("waiting")
        self._set_members({})
        self._replan_at_restore(step, f"{why} (applied at the checkpoint of step {step})")

    # -- applying ----------------------------------------------------------------------
    def _apply_plan(self, decision: PlanDecision, why: str, restore: bool = False) -> None:
        n_layer = self.plan[-1].end
        old_specs, new_specs = self.plan, [s.spec(n_layer) for s in decision.stages]
        new = {w: i for i, s in enumerate(decision.stages) for w in s.workers}
        members = self._members()
        moved, held_moved = [], False
        for r in self.db.execute("SELECT * FROM workers WHERE state IN ('loading', 'ready', 'standby')").fetchall():
            stage = new.get(r["id"], -1)
            before = old_specs[r["stage"]] if r["stage"] >= 0 else None
            after = new_specs[stage] if stage >= 0 else None
            if stage == r["stage"] and before == after:
                continue
            self.db.execute("UPDATE workers SET stage=?, state=?, loaded_epoch=-1, position=-1 WHERE id=?",
                            (stage, "loading" if stage >= 0 else "standby", r["id"]))
            if r["stage"] >= 0:
                held_moved = True
                if r["id"] in members.get(r["stage"], []):
                    members[r["stage"]].remove(r["id"])
            moved.append(f"{r['id']} {_where(r['stage'], before)} -> {_where(stage, after)}")
        self._set_members(members)
        ranges_changed = [(s.start, s.end) for s in new_specs] != [(s.start, s.end) for s in old_specs]
        self._set_plan(new_specs)
        self._set_meta("predicted_step_s", decision.predicted_step_s)
        if not moved and not ranges_changed:
            return
        self._set_meta("plan_version", self.plan_version + 1)
        if held_moved:
            # A worker that held (or was loading) a stage holds another now: its heartbeats still
            # report the old epoch until it has reloaded, so the epoch moves on for everyone
            # (unmoved workers keep their weights: same range, same position).
            self._set_meta("restore_epoch", self.restore_epoch + 1)
        record = {"why": why, "step": self.step, "at": self.clock(), "layers_moved": decision.layers_moved,
                  "predicted_step_s": decision.predicted_step_s, "workers_moved": len(moved),
                  "ranges": [[s.start, s.end] for s in new_specs], "at_restore": restore}
        self._set_meta("last_replan", json.dumps(record))
        total = int(self._meta("layers_moved_total") or 0) + decision.layers_moved
        self._set_meta("layers_moved_total", total)
        self._event("replanned", f"{why}: layers {', '.join(f'{s.start}-{s.end}' for s in new_specs)}, "
                    f"predicted {decision.predicted_step_s:.3g} s/step, {decision.layers_moved} layer(s) "
                    f"moved; " + ("; ".join(moved) if moved else "no worker moves"))

    # -- reporting ---------------------------------------------------------------------
    def plan_status(self) -> dict:
        """The `plan` object of the status JSON."""
        steps = self.db.execute("SELECT closed - opened FROM steps ORDER BY step DESC LIMIT 5").fetchall()
        predicted = self._meta("predicted_step_s")
        last = self._meta("last_replan")
        return {"placement": self.run.scheduler.placement,
                "ranges": [[s.start, s.end] for s in self.plan],
                "predicted_step_s": float(predicted) if predicted is not None else None,
                "measured_step_s": statistics.median(r[0] for r in steps) if steps else None,
                "last_replan": json.loads(last) if last else None,
                "pending": self._meta("pending_plan") or "",
                "layers_moved_total": int(self._meta("layers_moved_total") or 0),
                "standby_why": json.loads(self._meta("standby_why") or "{}"),
                "min_workers": self.run.scheduler.min_workers,
                "measured_workers": self._measured_workers()}


def _where(stage: int, spec: StageSpec | None) -> str:
    return f"stage {stage} ({spec.start}-{spec.end})" if spec is not None else "standby"
