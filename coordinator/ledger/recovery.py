"""What a lost worker, a vacated stage or a completed checkpoint means for the step: restarts,
restores and rollbacks that keep every closed step exactly once.

A member that dies mid-step takes its gradient share with it: its leased tickets are re-issued
to the other replicas, and at averaging the survivors' summed gradient is scaled by M / W (M
micro-batches in the step, W those the survivors hold), i.e. the lost share is estimated by
the survivors' mean per micro-batch. Only when a stage loses its LAST holder is its state gone:
if the store holds that stage at the current step (a drained worker saves before leaving), a
newcomer loads it and the step restarts (attempt + 1: the step's partial gradients are gone);
otherwise the run rolls back to the newest step the store covers completely (or to the initial
weights): steps after it are undone and re-run on the same data, and every stage reloads. Each
change of what stages must hold bumps the restore epoch.
"""

from __future__ import annotations

from .checkpoints import CheckpointIndex
from .db import ALIVE_STATES
from .events import EventLog
from .history import StepHistory
from .planning import StagePlanner
from .reports import ReportBook
from .step_state import ACCUMULATED, APPLYING, AVERAGING, DONE, OPEN, WAITING, StepState
from .steps import StepProtocol
from .tickets import TicketBook
from .workers import WorkerRegistry


class StepRecovery:
    """Keeps the step exactly once when a worker goes, a stage is vacated or a checkpoint completes."""

    def __init__(self, events: EventLog, state: StepState, workers: WorkerRegistry, tickets: TicketBook,
                 reports: ReportBook, history: StepHistory, checkpoints: CheckpointIndex, planner: StagePlanner,
                 protocol: StepProtocol):
        self.events, self.state, self.workers, self.tickets = events, state, workers, tickets
        self.reports, self.history, self.checkpoints = reports, history, checkpoints
        self.planner, self.protocol = planner, protocol

    # -- a worker gone -----------------------------------------------------------------
    def drop_worker(self, worker_id: str, state: str, event: str, why: str = "") -> None:
        """A worker left, died or was quarantined (`why`: the evidence, for the event): its leases
        go back, and its stage goes on, restarts or restores."""
        st, row = self.state, self.workers.row(worker_id)
        if row is None or row["state"] not in ALIVE_STATES:
            return
        self.workers.set_state(worker_id, state)
        released = self.tickets.release_all(worker_id)
        self.events.record(event, f"{worker_id} ({row['name']}), stage {row['stage']}; {released} leased ticket(s) "
                           "re-issued" + (f"; {why}" if why else ""))
        stage = row["stage"]
        if stage < 0:
            return
        st.bump_plan_version()
        members = st.members()
        was_member = worker_id in members.get(stage, [])
        if was_member:
            members[stage].remove(worker_id)
            st.set_members(members)
        holders = [r for r in self.workers.stage_workers().get(stage, []) if st.is_holder(r)]
        last_member_gone = was_member and not members.get(stage)
        phase, vacated = st.phase, False
        if phase == DONE:
            pass
        elif last_member_gone and phase in (OPEN, ACCUMULATED, AVERAGING) and holders:
            # The step's last member of this stage is gone, but a replica that joined mid-step
            # holds the same state: re-run the step with it (nothing closed is lost).
            self.protocol.restart_step(f"stage {stage} lost its last member {worker_id}; a joined replica takes over")
            st.set_phase(WAITING)
        elif last_member_gone and phase == APPLYING:
            # Other stages may have applied the step already; nobody holds this stage's update.
            self.events.record("stage_vacant", f"stage {stage} lost its last member while applying step {st.step}")
            self.vacate(stage, f"stage {stage} lost worker {worker_id}")
            vacated = True
        elif holders or (not was_member and not st.is_holder(row)):
            # Another replica holds the state (or this one held none): nothing is lost but the
            # dead replica's gradient share of the open step, estimated at averaging.
            if was_member and members.get(stage) and phase in (OPEN, ACCUMULATED, AVERAGING):
                self.events.record("replica_lost", f"stage {stage} goes on with {len(members[stage])} replica(s); "
                                   f"{worker_id}'s gradient share of step {st.step} is estimated from theirs")
            if self.protocol.advance():
                self.after_close()
        else:
            self.events.record("stage_vacant", f"stage {stage} has no worker holding its state; ticket issue waits")
            self.vacate(stage, f"stage {stage} lost worker {worker_id}")
            vacated = True
        self.planner.replan(f"{worker_id} {'died' if state == 'dead' else state}")
        if not vacated and self._left_empty(stage):
            # Its last worker held no state (it was still loading: after a restore, or as a
            # newcomer) and no standby took its place. The plan the search left pending for the
            # next checkpoint would wait forever: no step runs with an empty stage. Apply it now.
            self.events.record("stage_vacant", f"stage {stage} lost {worker_id}, its last worker, while it loaded, and "
                               f"no standby took its place: the waiting plan applies now ({self.planner.pending})")
            self.vacate(stage, f"stage {stage} lost {worker_id}, its last worker")
        self.protocol.maybe_open()

    def _left_empty(self, stage: int) -> bool:
        """Is `stage` of the plan in force left with no live worker, while a better plan waits for a checkpoint?"""
        return (self.state.phase != DONE and stage < len(self.planner.plan) and bool(self.planner.pending)
                and not self.workers.stage_workers().get(stage))

    def quarantine(self, worker_id: str, evidence: str) -> None:
        """Two recomputations agree that `worker_id` computed wrong: it gets no more work (its
        session ends; a join under its name and token is refused) and the run rolls back to the
        newest complete checkpoint from before the first step it worked on (else the initial
        weights): every step its outputs touched is re-run on the same data without it."""
        st, row = self.state, self.workers.row(worker_id)
        if row is None or row["state"] not in ALIVE_STATES:
            return  # out-voted in another dispute already (or gone): its steps were rolled back then
        first = self.reports.first_step(worker_id)
        self.drop_worker(worker_id, "quarantined", "worker_quarantined", evidence)
        if first is None or st.phase == DONE:
            return
        clean = [s for s in self.checkpoints.steps() if s <= first and self.checkpoints.is_complete(s)]
        target = max(clean, default=0)
        if target > st.step:
            return  # a restore the drop just started already went back further
        why = f"{worker_id} quarantined (it worked on steps {first} on)"
        if target == st.step:
            if st.phase in (OPEN, ACCUMULATED, AVERAGING, APPLYING) and self.tickets.has_work(st.step, st.attempt):
                self.protocol.restart_step(why)
        else:
            self.rollback(target, why)
        st.restore(target, from_store=bool(self.checkpoints.stored(target)))
        st.set_phase(WAITING)
        st.set_members({})
        self.planner.replan_at_restore(self.checkpoints.is_complete(target), f"{why}: every stage reloads at step "
                                       f"{target}")

    def vacate(self, stage: int, why: str) -> None:
        """The stage's state is gone with its worker: decide what every stage must hold now."""
        st = self.state
        step, spec = st.step, self.planner.plan[stage]
        # In APPLYING some stages may already hold step + 1: they too must reload, so the
        # store must cover the whole model at this step, not just the lost stage.
        covered = self.checkpoints.is_complete(step) if st.phase == APPLYING else self.checkpoints.covers(step, spec)
        target = step if covered else (self.checkpoints.latest_complete() or 0)
        if target == step:  # nothing closed is lost; only the open step's partial work
            if st.phase in (OPEN, ACCUMULATED, AVERAGING, APPLYING) and self.tickets.has_work(step, st.attempt):
                self.protocol.restart_step(why)
        else:
            self.rollback(target, why)
        st.restore(target, from_store=bool(self.checkpoints.stored(target)))
        st.set_phase(WAITING)
        st.set_members({})  # nobody holds the state to restore until it has loaded it
        self.planner.replan_at_restore(self.checkpoints.is_complete(target),
                                       f"{why}: every stage reloads at step {target}")

    def rollback(self, target: int, why: str) -> None:
        """Undo every step from `target` on: they are re-run on the same data from its state."""
        undone = self.history.undo_from(target)
        forgotten = self.checkpoints.forget_after(target)
        self.tickets.roll_back(target)
        self.reports.forget_from(target)
        self.state.step = target
        self.state.attempt = self.tickets.next_attempt(target)
        self.events.record("rolled_back", f"{why}: run rolled back to step {target} "
                           + ("(checkpoint)" if self.checkpoints.stored(target) else "(the run's initial weights)")
                           + (f"; steps {undone} will be re-run" if undone else "")
                           + (f"; the checkpoints of steps {forgotten} are forgotten" if forgotten else ""))

    # -- restore points ----------------------------------------------------------------
    def maybe_apply_pending(self, step: int) -> None:
        """The store just completed `step`: a pending plan applies if the run is at that step and
        no stage has applied it yet (its partial work restarts, every stage reloads), unless priced
        again there the plan in force wins (StagePlanner.pending_decision). None is pending once
        the run has no step left (StagePlanner.pending)."""
        st, planner = self.state, self.planner
        if (not planner.pending or step != st.step or st.phase not in (WAITING, OPEN)
                or not planner.scheduling() or not self.checkpoints.is_complete(step)):
            return  # (a checkpoint of step + 1 lands while step is applying: the close calls again)
        why, decision = planner.pending, planner.pending_decision()
        if decision is None:
            return  # the plan in force stays (an event says why): nobody reloads, the step goes on
        if st.phase == OPEN and self.tickets.has_work(step, st.attempt):
            self.protocol.restart_step(f"re-plan at the checkpoint of step {step}")
        st.restore(step, from_store=True)
        st.set_phase(WAITING)
        st.set_members({})
        planner.apply(decision, f"{why} (applied at the checkpoint of step {step})", restore=True)
        planner.stall.started(decision.stall_layers)  # its reloads hold the run until a step opens

    def after_close(self) -> None:
        """A step just closed: holds that ended free their workers, a checkpoint that landed while
        it applied may make this a restore point, and the next step may open."""
        if self.expire_holds():
            self.planner.replan("replicas held out after an averaging fallback may take part again")
        self.maybe_apply_pending(self.state.step)  # its checkpoint may have landed while it was applying
        self.protocol.maybe_open()

    def expire_holds(self) -> bool:
        """Drop holds that ended by the current step; True if any did (the caller re-plans)."""
        holds = self.state.held_out()
        kept = {w: until for w, until in holds.items() if until > self.state.step}
        if kept != holds:
            self.state.set_held_out(kept)
        return len(kept) != len(holds)
