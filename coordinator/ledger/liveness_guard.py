"""The ledger's side of liveness: gather a phase's facts, apply the remedy coordinator/liveness.py names.

Its facts: when the phase began, the members' reports, leased tickets and the last commit, the
causes replicas reported for failed averaging rounds, and how often this step was already
restarted for being stuck. Every stall becomes a `step_stuck` event naming the cause and the
remedy, and the `liveness` object of the status.
"""

from __future__ import annotations

import json

from gptjt_core.config import RunConfig

from .. import liveness
from ..liveness import DROP_WORKERS, REDUCE_REPLICAS, RESTART_STEP, Limits, PhaseFacts, Stall
from .db import LedgerDB
from .events import EventLog
from .recovery import StepRecovery
from .reports import ReportBook
from .step_state import AVERAGING, WAITING, StepState
from .steps import StepProtocol
from .tickets import TicketBook
from .workers import WorkerRegistry

_REPORT_OF_PHASE = {"accumulated": "contribution", "averaging": "averaged", "applying": "applied"}


class LivenessGuard:
    """Judges the open step's phase against its deadline and applies the remedy."""

    def __init__(self, db: LedgerDB, events: EventLog, state: StepState, workers: WorkerRegistry,
                 tickets: TicketBook, reports: ReportBook, protocol: StepProtocol, recovery: StepRecovery,
                 run: RunConfig):
        self.db, self.events, self.state, self.workers = db, events, state, workers
        self.tickets, self.reports, self.protocol, self.recovery, self.run = tickets, reports, protocol, recovery, run

    # -- facts -------------------------------------------------------------------------
    def limits(self) -> Limits:
        c, a = self.run.coordinator, self.run.averaging
        return Limits(c.phase_timeout_s, 3 * a.timeout_s, c.max_stall_restarts, a.max_restarts)

    def _restarts(self, phase: str) -> int:
        counts = self.db.json_meta("stall_restarts", {})
        return counts.get(phase, 0) if counts.get("step") == self.state.step else 0

    def _count_restart(self, phase: str) -> None:
        counts = self.db.json_meta("stall_restarts", {})
        if counts.get("step") != self.state.step:
            counts = {"step": self.state.step}
        counts[phase] = counts.get(phase, 0) + 1
        self.db.set_json_meta("stall_restarts", counts)

    def averaging_causes(self) -> dict:
        """{worker: {"detail", "rounds"}} reported for the current (step, attempt)."""
        saved = self.db.json_meta("averaging_causes", {})
        return saved.get("workers", {}) if saved.get("key") == [self.state.step, self.state.attempt] else {}

    def facts(self) -> PhaseFacts | None:
        st = self.state
        phase = st.phase
        if phase not in ("open", "accumulated", "averaging", "applying"):
            return None
        now = self.db.clock()
        since = st.phase_since or now
        kind = _REPORT_OF_PHASE.get(phase)
        reported = set(self.reports.by_worker(st.step, st.attempt, kind)) if kind else set()
        leases, progress = {}, since
        if phase == "open":
            leases = self.tickets.leases(st.step, st.attempt)
            progress = max(since, self.tickets.last_commit(st.step, st.attempt) or 0.0)
        saved = self.averaging_causes()
        causes = {w: f"{c['detail']} ({c['rounds']} round(s))" for w, c in saved.items()}
        stranded = {w for w, c in saved.items() if c.get("stranded")}
        return PhaseFacts(phase, now - since, now - progress, st.paused, st.members(), reported, leases,
                          self._restarts(phase), causes, stranded)

    # -- judging -----------------------------------------------------------------------
    def judge(self) -> Stall | None:
        """The current phase's stall (None while within its deadline); the caller applies it in a
        transaction with `apply`."""
        facts = self.facts()
        return liveness.judge(facts, self.limits()) if facts is not None else None

    def apply(self, stall: Stall) -> None:
        st, limits = self.state, self.limits()
        step, attempt = st.step, st.attempt
        remedy = liveness.remedy_text(stall, self._restarts(stall.phase), limits)
        self.events.record("step_stuck", f"step {step} attempt {attempt} stuck in {stall.phase}: {stall.cause}; "
                           f"remedy: {remedy}")
        self.db.set_json_meta("last_stall", {"step": step, "attempt": attempt, "phase": stall.phase,
                                             "cause": stall.cause, "remedy": remedy, "at": self.db.clock()})
        if stall.remedy == RESTART_STEP:
            self._count_restart(stall.phase)
            self.protocol.restart_step(f"stuck in {stall.phase}: {stall.cause}")
            st.set_phase(WAITING)
            self.protocol.maybe_open()
        elif stall.remedy == DROP_WORKERS:
            for worker_id in stall.workers:
                row = self.workers.row(worker_id)
                if row is not None:
                    self.events.record("worker_stuck", f"{worker_id} ({row['name']}), stage {row['stage']}: stuck "
                                       f"in {stall.phase} of step {step}")
                    self.recovery.drop_worker(worker_id, "dead", "worker_dead")
        elif stall.remedy == REDUCE_REPLICAS:
            self._reduce_to_one_replica(stall.stages)
            self.protocol.restart_step(f"stage(s) {', '.join(map(str, stall.stages))} fall back to one replica: "
                                       f"{stall.cause}")
            st.set_phase(WAITING)
            self.protocol.maybe_open()

    def _reduce_to_one_replica(self, stages: tuple[int, ...]) -> None:
        """Keep each stage's checkpoint writer (its smallest member id); hold the others out of the
        stage for averaging.fallback_steps steps. They stay live, on standby."""
        st = self.state
        members, holds = st.members(), st.held_out()
        until = st.step + self.run.averaging.fallback_steps
        for stage in stages:
            ids = sorted(members.get(stage, []))
            for worker_id in ids[1:]:
                self.workers.assign(worker_id, -1)
                holds[worker_id] = until
            members[stage] = ids[:1]
            self.events.record("replicas_reduced", f"stage {stage} continues with replica {ids[0] if ids else '-'} "
                               f"alone; {', '.join(ids[1:]) or 'nobody'} held out of it until step {until}")
        st.set_members(members)
        st.set_held_out(holds)
        st.bump_plan_version()

    # -- reports of failed rounds ------------------------------------------------------
    def averaging_failed(self, worker_id: str, step: int, attempt: int, detail: str) -> bool:
        """A member replica's averaging round failed: keep its cause for the stall diagnosis, and
        an event for the first failure of each replica in each attempt (not one per retry)."""
        st, row = self.state, self.workers.row(worker_id)
        if (row is None or row["stage"] < 0 or (step, attempt) != (st.step, st.attempt) or st.phase != AVERAGING
                or worker_id not in st.members().get(row["stage"], [])):
            return False
        saved = self.db.json_meta("averaging_causes", {})
        if saved.get("key") != [step, attempt]:
            saved = {"key": [step, attempt], "workers": {}}
        first = worker_id not in saved["workers"]
        rounds = saved["workers"].get(worker_id, {}).get("rounds", 0) + 1
        # Reported after every other replica of its stage had its sum: it can never find a group
        # again in this attempt (the others do not round twice), so the step is restarted now.
        # Its earlier failures were reported before it began the round the others finished.
        others = [w for w in st.members().get(row["stage"], []) if w != worker_id]
        summed = self.reports.by_worker(step, attempt, "averaged")
        stranded = (saved["workers"].get(worker_id, {}).get("stranded", False)
                    or (bool(others) and all(w in summed for w in others)))
        saved["workers"][worker_id] = {"detail": detail or "no cause given", "rounds": rounds, "stranded": stranded}
        self.db.set_json_meta("averaging_causes", saved)
        if first:
            self.events.record("averaging_failed", f"step {step} attempt {attempt}: stage {row['stage']} replica "
                               f"{worker_id} ({row['name']}): {detail or 'no cause given'}")
        return True

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict:
        """The `liveness` object of the status JSON."""
        st, limits = self.state, self.limits()
        since = st.phase_since
        deadline = {"open": limits.phase_timeout_s, "accumulated": limits.phase_timeout_s,
                    "applying": limits.phase_timeout_s, "averaging": limits.averaging_timeout_s}.get(st.phase)
        counts = self.db.json_meta("stall_restarts", {})
        return {"phase_since": since,
                "phase_age_s": round(self.db.clock() - since, 3) if since else None,
                "deadline_s": deadline,
                "stall_restarts": {k: v for k, v in counts.items() if k != "step"} if counts.get("step") == st.step
                else {},
                "last_stall": json.loads(self.db.meta("last_stall")) if self.db.meta("last_stall") else None,
                "held_out": st.held_out(),
                "averaging_failures": self.averaging_causes()}
