"""Each stage's averaging round, timed on the coordinator's clock: the cost model's averaging rate.

The cost model priced a replica group's all-reduce at its links' speed, but the rounds go
through hivemind's averager in a sidecar process: on loopback (~2-3 Gbit/s links) the tiny
flavour's rounds ran at ~0.3 Gbit/s, so the scheduler chose one stage of two replicas predicted
at 1.41 s a step that took 3.39 s, slower than the pipeline it passed over (bench costmodel,
2026-12-06). A round is timed from the step's AVERAGING phase (all stages start it together) to
its stage's last AVERAGED report, so no worker's word goes into it, only its pace; what the
members take to read the phase from their Watch streams is in it, as it is in every step.
The rate (cost_model.averaging_rate_gbps) is kept for each member (Measurements.record_averaging)
and prices its groups from then on; a move of more than 20 % re-plans. After a coordinator
restart the phase clock restarts (RunLedger._resume), so that one round reads fast.
"""

from __future__ import annotations

from ..cost_model import averaging_rate_gbps
from ..scheduler import workload
from .planning import StagePlanner
from .reports import AVERAGED, ReportBook
from .step_state import AVERAGING

Round = tuple[int, list[str], float]  # (stage, its members, seconds since the AVERAGING phase began)


class AveragingRounds:
    """Times the round a report completes, and records its rate once the report is in."""

    def __init__(self, planner: StagePlanner, reports: ReportBook):
        self.planner, self.reports = planner, reports  # the planner's stores are the rest of what this reads
        self.db, self.state, self.workers, self.measurements = planner.db, planner.state, planner.workers, \
            planner.measurements
        self.run, self.shape = planner.run, planner.shape

    def completed_by(self, worker_id: str, kind: str) -> Round | None:
        """The round `worker_id`'s report (accepted, not recorded yet) completes: its stage's last
        missing AVERAGED in a group of two or more. Asked before the report moves the phase on."""
        if kind != AVERAGED or self.shape is None:
            return None  # (before any read: every report of the step comes through here)
        st, row = self.state, self.workers.row(worker_id)
        if st.phase != AVERAGING or row is None:
            return None
        members, since = st.members().get(row["stage"], []), st.phase_since
        if len(members) < 2 or since is None:
            return None
        reported = self.reports.by_worker(st.step, st.attempt, AVERAGED)
        if any(w not in reported for w in members if w != worker_id):
            return None
        return row["stage"], list(members), self.db.clock() - since

    def record(self, timed: Round | None) -> None:
        """Keep the round's rate for its members; re-plan when it moved (Measurements.MOVED)."""
        if timed is None:
            return
        stage, members, seconds = timed
        if not seconds > 0:
            return  # no time passed: bench churn's virtual clock reports a step's rounds at once
        spec = self.planner.plan[stage]
        gbps = averaging_rate_gbps(self.shape, workload(self.run), spec.start, spec.end, len(members), seconds)
        changed = self.measurements.record_averaging(members, gbps)
        if changed:
            self.planner.replan("new measurement: " + "; ".join(changed))
