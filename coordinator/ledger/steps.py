"""The step protocol, exactly once: open a step, lease and commit its tickets, collect the members'
reports phase by phase, close it.

  OPEN         tickets of (step, attempt) are leased by stage-0 replicas and committed once each;
               each micro-batch passes through exactly one replica of every stage
  ACCUMULATED  all committed; every replica reports its own gradient's norm^2 (CONTRIBUTION),
               unscaled; when the step ran loss-scaled and a norm is not finite, the gradients
               overflowed: the step re-runs at half the scale (loss_scaling.py)
  AVERAGING    (replicas_per_stage > 1) contributions judged (rules.judge_contributions); each
               stage's replicas sum their gradients through hivemind and report the summed
               norm^2 (AVERAGED); they must agree (rules.replicas_disagree)
  APPLYING     the global norm is known; every replica applies its optimizer step (APPLIED)
  With averaging.mode "local-steps" (DiLoCo-style) replicas step on their own gradients:
  contributions are judged as above, then APPLYING follows at once; only at an outer step
  (every averaging.outer_every steps) do the replicas pass through AVERAGING, where they
  average their pseudo-gradients (anchor - parameters) and must agree on the result, and the
  APPLIED digests are of the anchor, the state replicas share.
  -> step + 1, WAITING again (or DONE).

The members of a step are the replicas of each stage that hold the run's current state when it
opens (a replica that comes to hold it while the step is OPEN is admitted). A step opens only
when every stage has a READY member with the current restore epoch loaded, so every closed step
counts each of its micro-batches exactly once. What a death means for the step is recovery.py's.
"""

from __future__ import annotations

from gptjt_core.config import RunConfig

from . import rules
from .db import LedgerDB
from .events import EventLog
from .commitments import CommitmentBook, Submitted
from .history import StepHistory
from .loss_scaling import LossScaleBook
from .measurements import Measurements
from .replan_stall import ReplanStall
from .reports import APPLIED, AVERAGED, CONTRIBUTION, ReportBook, contributions, sums
from .spot_checks import SpotCheckBook
from .step_state import ACCUMULATED, APPLYING, AVERAGING, DONE, OPEN, WAITING, StepState
from .tickets import TicketBook, TicketRow
from .workers import WorkerRegistry

_REPORT_PHASE = {CONTRIBUTION: ACCUMULATED, AVERAGED: AVERAGING, APPLIED: APPLYING}


class StepProtocol:
    """Moves the open step through its phases as tickets commit and members report."""

    def __init__(self, db: LedgerDB, events: EventLog, state: StepState, workers: WorkerRegistry,
                 tickets: TicketBook, reports: ReportBook, history: StepHistory, measurements: Measurements,
                 run: RunConfig, plan, commitments: CommitmentBook, spot_checks: SpotCheckBook,
                 replan_stall: ReplanStall):
        self.db, self.events, self.state, self.workers = db, events, state, workers
        self.tickets, self.reports, self.history, self.measurements = tickets, reports, history, measurements
        self.run = run
        self.plan = plan  # () -> the plan in force: a StageSpec per stage
        self.commitments = commitments
        self.spot_checks = spot_checks
        self.loss_scales = LossScaleBook(db, events, run)  # the scale each attempt runs at (fp16)
        self.replan_stall = replan_stall  # a checkpoint re-plan's reloads end when a step opens

    # -- opening -----------------------------------------------------------------------
    def maybe_open(self) -> None:
        """WAITING -> OPEN once every stage has a READY replica holding the current state;
        those replicas are the step's members."""
        st = self.state
        if st.phase != WAITING:
            return
        workers = self.workers.stage_workers()
        epoch, step = st.restore_epoch, st.step
        members = {s: [w["id"] for w in workers.get(s, []) if w["state"] == "ready" and w["loaded_epoch"] == epoch
                       and w["position"] == step] for s in range(len(self.plan()))}
        first = st.step_opened is None
        needed = self.run.pipeline.start_with_replicas if first else 1
        if first and self.run.scheduler.min_workers and \
                self.measurements.measured_workers() < self.run.scheduler.min_workers:
            return  # the first plan waits to see scheduler.min_workers measured workers
        joining = [w["id"] for s, ws in workers.items() for w in ws
                   if w["state"] in ("ready", "loading") and w["id"] not in members[s]]
        if joining and self.db.clock() - st.step_closed_at < self.run.pipeline.joiner_grace_s:
            return  # a replica is still copying the state; the reaper re-checks when the grace ends
        if not all(len(ids) >= needed for ids in members.values()):
            return
        if step >= self.run.train.steps:
            st.set_phase(DONE)
            self.spot_checks.end_of_run()
            return
        st.set_members(members)
        st.set_contributors({})
        member_ids = {w for ids in members.values() for w in ids}
        self.loss_scales.open_attempt(step, st.attempt, [w for ws in workers.values() for w in ws
                                                         if w["id"] in member_ids])
        if not self.tickets.exist(step, st.attempt):
            self.tickets.create(step, st.attempt)
            st.mark_opened()
        st.set_phase(OPEN)
        self.replan_stall.step_opened()
        # which layers each stage runs and on whom: an operator reading the events (and bench
        # churn's agreement test) sees the plan every step ran on
        on = "; ".join(f"stage {i} (layers {spec.start}-{spec.end}) on {', '.join(members.get(i, []))}"
                       for i, spec in enumerate(self.plan()))
        self.events.record("step_open", f"step {step} attempt {st.attempt}: {on}")

    def admit_to_open_step(self, worker_id: str) -> None:
        """A replica that came to hold the current state while the step is OPEN takes part at
        once: its gradients start at zero like everyone's, and averaging is still ahead."""
        st, row = self.state, self.workers.row(worker_id)
        if (st.phase != OPEN or row is None or row["stage"] < 0 or row["state"] != "ready"
                or row["loaded_epoch"] != st.restore_epoch or row["position"] != st.step):
            return
        members = st.members()
        if worker_id not in members.setdefault(row["stage"], []):
            members[row["stage"]].append(worker_id)
            st.set_members(members)
            self.events.record("replica_admitted", f"{worker_id} takes part in step {st.step} as a replica of "
                               f"stage {row['stage']}")

    # -- tickets -----------------------------------------------------------------------
    def why_no_lease(self, worker_id: str) -> str:
        """Why this worker may not lease now ("" if it may)."""
        st, row = self.state, self.workers.row(worker_id)
        if row is None or not self.workers.is_alive(worker_id):
            return "unknown or dead worker: re-join"
        if row["stage"] != 0:
            return f"only stage 0 leases tickets; this worker holds stage {row['stage']}"
        if st.paused:
            return "ticket issue is paused by the operator"
        if st.phase != OPEN:
            return f"step {st.step} is {st.phase}"
        if worker_id not in st.members().get(0, []):
            return f"this replica joined during step {st.step}; it takes part from the next step"
        return ""

    def lease(self, worker_id: str, max_tickets: int) -> list[TicketRow]:
        """Tickets for a stage-0 member (why_no_lease said yes), its own shards first: stage 0's
        members in id order deal the shards between them (tickets.lease), when there are at
        least as many shards as members (else some would own none: no preference)."""
        replicas = sorted(self.state.members().get(0, []))
        if worker_id not in replicas or len(replicas) > self.run.data.num_shards:
            return self.tickets.lease(worker_id, self.state.step, self.state.attempt, max_tickets)
        return self.tickets.lease(worker_id, self.state.step, self.state.attempt, max_tickets,
                                  (replicas.index(worker_id), len(replicas)))

    def commit(self, worker_id: str, ticket_id: int, attempt: int, loss: float, tokens: int) -> str:
        result, all_committed = self.tickets.commit(worker_id, ticket_id, attempt, loss, tokens)
        if result == "committed":
            self.workers.count_ticket(worker_id)
            if all_committed and self.state.phase == OPEN:
                self.state.set_phase(ACCUMULATED)
                self.events.record("step_accumulated", f"step {self.state.step}: every ticket committed")
        return result

    # -- reports -----------------------------------------------------------------------
    def accepts(self, worker_id: str, step: int, attempt: int, kind: str) -> bool:
        """Is this the report the protocol waits for from this member now?"""
        st, row = self.state, self.workers.row(worker_id)
        return not (row is None or row["stage"] < 0 or step != st.step or attempt != st.attempt
                    or kind not in _REPORT_PHASE or st.phase != _REPORT_PHASE[kind]
                    or worker_id not in st.members().get(row["stage"], []))

    def report(self, worker_id: str, kind: str, grad_norm_sq: float, micro_batches: int, group_weight: float,
               digest: str, commitments: list[Submitted] = ()) -> bool:
        """Record a member's report (`accepts` said yes; a CONTRIBUTION's commitments with it)
        and move on; True if a step closed."""
        st, row = self.state, self.workers.row(worker_id)
        self.reports.record(st.step, st.attempt, worker_id, kind, row["stage"], grad_norm_sq, micro_batches,
                            group_weight, digest)
        if kind == CONTRIBUTION and commitments:
            kept = self.commitments.record(st.step, st.attempt, row["stage"], worker_id, list(commitments))
            self.spot_checks.draw(st.step, st.attempt, row["stage"], worker_id, kept,
                                  st.members().get(row["stage"], []), st.restore_epoch)
        if kind == APPLIED:
            self.workers.set_position(worker_id, st.step + 1)
        return self.advance()

    def advance(self) -> bool:
        """Move the step on once every member replica has reported for the current phase; True
        if that closed the step (the caller then runs recovery.after_close)."""
        st = self.state
        phase, members = st.phase, st.members()
        if any(not ids for ids in members.values()):
            return False  # a stage without members is being restored; recovery handles it
        kind = {ACCUMULATED: CONTRIBUTION, AVERAGING: AVERAGED, APPLYING: APPLIED}.get(phase)
        done = self.reports.complete(st.step, st.attempt, kind, members) if kind else None
        if done is None:
            return False
        if phase == ACCUMULATED:
            problem = (self._overcounted(contributions(done))
                       or self.loss_scales.overflowed(st.step, st.attempt, contributions(done)))
            if problem:
                self.restart_step(problem)
                st.set_phase(WAITING)
                self.maybe_open()
                return False
            if self.run.pipeline.replicas_per_stage == 1:
                st.grad_norm = rules.total_norm(contributions(done))
                st.set_phase(APPLYING)
            else:
                self._judge(contributions(done))
        elif phase == AVERAGING:
            summed = sums(done)
            problem = rules.replicas_disagree(summed, exact=self.run.averaging.compression == "none")
            if problem:
                self.restart_step(problem)
                st.set_phase(WAITING)
                self.maybe_open()
                return False
            if self.run.averaging.mode != "local-steps":  # there the norms are of the pseudo-gradient
                st.grad_norm = rules.averaged_norm(summed)
            st.set_phase(APPLYING)
        else:
            if self.run.averaging.compression == "none":  # lossy rounds leave replicas a rounding apart
                for stage, rows in done.items():
                    if len({r["digest"] for r in rows}) > 1:
                        self.events.record("replicas_diverged", f"step {st.step}: stage {stage}'s replicas hold "
                                           f"different parameters after the update ({len({r['digest'] for r in rows})} "
                                           "digests)")
            self._close()
            return True
        return False

    def _overcounted(self, done: dict[int, list[rules.Contribution]]) -> str:
        """Why the step's gradients hold some micro-batch twice, or ''. A ticket handed back after
        a stage had already kept its gradient (its commit refused, the pipeline failing past
        that stage) is re-done by a replica: that stage then sums more micro-batches than the
        step has. Only a new attempt (every replica's partial sums dropped) makes it right."""
        total = self.run.train.micro_batches_per_step
        for stage, contributed in sorted(done.items()):
            summed = sum(c.micro_batches for c in contributed)
            if summed > total:
                return (f"stage {stage}'s replicas kept the gradients of {summed} micro-batches for the step's "
                        f"{total} (a ticket handed back after its gradient was kept was done again); re-running the "
                        "step so that none counts twice")
        return ""

    def _judge(self, done: dict[int, list[rules.Contribution]]) -> None:
        """ACCUMULATED -> AVERAGING (or APPLYING): refuse non-finite or far-too-large contributions."""
        st, avg = self.state, self.run.averaging
        verdict = rules.judge_contributions(done, st.norm_refs(), avg.poison_norm_factor)
        for stage, worker_id, why in verdict.refused:
            name = self.workers.row(worker_id)["name"]
            self.events.record("poisoned_update", f"step {st.step}: stage {stage} replica {worker_id} ({name}): "
                               f"{why}; its contribution is refused and its share estimated from the others")
        st.set_norm_refs(verdict.refs)
        st.set_contributors(verdict.contributors)
        if verdict.skip:
            # Some stage has no usable gradient: nobody updates (as with a NaN global norm). An
            # outer step still happens: it averages inner steps that were accepted before.
            self.events.record("step_skipped", f"step {st.step}: a stage has no acceptable gradient; update skipped")
            st.grad_norm = float("nan")
            st.set_phase(AVERAGING if avg.is_outer_step(st.step) else APPLYING)
            return
        if avg.mode == "local-steps":
            # Each replica steps on its own gradient scaled to a full batch; clip by the replicas'
            # mean of that, over the stages.
            st.grad_norm = rules.local_grad_norm(done, verdict.contributors, self.run.train.micro_batches_per_step)
            if not avg.is_outer_step(st.step):
                st.set_phase(APPLYING)  # an inner step: nothing to average
                return
        st.set_phase(AVERAGING)

    # -- closing and restarting --------------------------------------------------------
    def _close(self) -> None:
        st = self.state
        step, attempt = st.step, st.attempt
        loss, tokens = self.tickets.totals(step, attempt)
        opened = st.step_opened or self.db.clock()
        detail = self.reports.detail(step, attempt)
        exact = self.run.averaging.compression == "none"
        for index, spec in enumerate(self.plan()):  # the range the digests are of (a joiner's copy is checked
            if str(index) in detail:                 # against them only while its stage keeps that range)
                detail[str(index)]["layers"] = [spec.start, spec.end]
                detail[str(index)]["attested"] = rules.attested_digests(detail[str(index)]["digests"], exact)
        self.history.close(step, attempt + 1, loss, tokens, st.grad_norm, opened, detail)
        self.tickets.audit(step)
        self.commitments.check_chain(step, attempt)
        self.spot_checks.expire(step, st.restore_epoch)
        self.loss_scales.closed(step, attempt)
        self.events.record("step_closed", f"step {step}: loss {loss:.4f}, {tokens} tokens")
        st.step = step + 1
        st.mark_closed()
        st.attempt = self.tickets.next_attempt(step + 1)  # 0 unless a rollback re-runs it
        st.set_phase(WAITING)

    def restart_step(self, why: str) -> None:
        """Gradients of this attempt are gone: re-issue every ticket of the step (attempt + 1)."""
        st = self.state
        step, attempt = st.step, st.attempt
        self.tickets.abort(step, attempt)
        self.reports.forget_attempt(step, attempt)
        st.attempt = attempt + 1
        self.tickets.create(step, attempt + 1, reissue=True)
        self.events.record("step_restarted", f"step {step} attempt {attempt} -> {attempt + 1}: {why}")

    def global_grad_norm(self) -> float:
        return self.state.grad_norm
