"""What an operator asks of the run through the ledger: pause or resume ticket issue, drain a worker.

Each request records an event, so the event log in the ledger file tells what an operator did
and survives a restart. The admin token is checked before these are called
(coordinator/operator_service.py).
"""

from __future__ import annotations

from .db import ALIVE_STATES, LedgerDB
from .errors import OperatorError
from .events import EventLog
from .step_state import StepState
from .workers import WorkerRegistry


class OperatorRequests:
    """Pause, resume and drain requests (the admin token is checked by the caller)."""

    def __init__(self, db: LedgerDB, events: EventLog, state: StepState, workers: WorkerRegistry):
        self.db, self.events, self.state, self.workers = db, events, state, workers

    def set_paused(self, paused: bool) -> dict:
        """Stop or restart ticket issue; workers see RunState.paused and stop leasing."""
        changed = self.state.paused != paused
        if changed:
            self.state.paused = paused
            self.events.record("paused" if paused else "resumed",
                               f"ticket issue {'paused' if paused else 'resumed'} by the operator at step "
                               f"{self.state.step}")
        return {"paused": paused, "changed": changed, "step": self.state.step}

    def lift_quarantine(self, worker_id: str) -> dict:
        """Let a quarantined worker's volunteer join again (its old id stays gone: state 'left')."""
        row = self.workers.row(worker_id)
        if row is None or row["state"] != "quarantined":
            quarantined = [r[0] for r in self.db.execute("SELECT id FROM workers WHERE state='quarantined'")]
            raise OperatorError(f"{worker_id!r} is not a quarantined worker; quarantined now: "
                                f"{', '.join(quarantined) or 'none'}", "invalid")
        self.workers.set_state(worker_id, "left")
        self.events.record("quarantine_lifted", f"{worker_id} ({row['name']}): the operator lifted its quarantine; "
                           "a join under its name is taken again")
        return {"worker": worker_id, "name": row["name"]}

    def request_drain(self, ref: str) -> dict:
        """Ask a worker to finish the current step and leave (it reads RunState.drain)."""
        row = self.workers.resolve(ref)
        worker_id = row["id"]
        if row["state"] not in ALIVE_STATES:
            raise OperatorError(f"worker {worker_id} ({row['name']}) is {row['state']}; there is nothing to drain",
                                "precondition")
        drains = self.state.drains()
        already = worker_id in drains
        if not already:
            drains[worker_id] = self.db.clock()
            self.state.set_drains(drains)
            self.events.record("drain_requested", f"{worker_id} ({row['name']}), stage {row['stage']}: asked to "
                               "drain by the operator")
        warning = ""
        if row["stage"] >= 0:
            others = [w for w in self.workers.stage_workers().get(row["stage"], []) if w["id"] != worker_id]
            standby = [r["id"] for r in self.workers.standby() if r["id"] not in drains]
            if not others and not standby:
                warning = (f"stage {row['stage']} has no other replica and no worker is on standby: the run "
                           "waits for a new worker once this one leaves")
        return {"worker": worker_id, "name": row["name"], "stage": row["stage"], "drain_requested": True,
                "already_requested": already, "warning": warning}
