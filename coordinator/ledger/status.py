"""The status object (`gptjt status --json`, the dashboard, /metrics): every number an operator sees.

Apart from the state machine: it only reads. Its cost does not grow with the run's length
beyond a few aggregate queries (the dashboard asks for it every second, on the coordinator's
event loop): the newest steps in full, the whole run bucketed, kept exactly-once verdicts.
"""

from __future__ import annotations

import json

from gptjt_core.config import RunConfig

from .checkpoints import CheckpointIndex
from .commitments import CommitmentBook
from .loss_scaling import LossScaleBook
from .spot_checks import SpotCheckBook
from .db import ALIVE_STATES, LedgerDB
from .events import EventLog
from .history import StepHistory
from .liveness_guard import LivenessGuard
from .measurements import Measurements
from .planning import StagePlanner
from .step_state import StepState
from .stored_values import ParsedColumns, shown_float, stored_json
from .tickets import TicketBook
from .tokens import TokenStore
from .workers import WorkerRegistry


class StatusView:
    """Builds the status object from the stores (read-only)."""

    def __init__(self, run: RunConfig, db: LedgerDB, events: EventLog, state: StepState, workers: WorkerRegistry,
                 tickets: TicketBook, checkpoints: CheckpointIndex, history: StepHistory, planner: StagePlanner,
                 guard: LivenessGuard, measurements: Measurements, tokens: TokenStore):
        self.run, self.db, self.events, self.state, self.workers = run, db, events, state, workers
        self.tickets, self.checkpoints, self.history, self.planner = tickets, checkpoints, history, planner
        self.guard, self.measurements, self.tokens = guard, measurements, tokens
        self.parsed = ParsedColumns()  # workers' device and metrics JSON, parsed once per distinct text

    def status(self) -> dict:
        st, now = self.state, self.db.clock()
        steps = self.history.recent()
        recent = steps[-5:]
        span = (recent[-1]["closed"] - recent[0]["opened"]) if recent else 0.0
        status = {
            "run": self.run.name, "model_source": self.run.model.source, "tokenizer": self.run.data.tokenizer,
            "step": st.step, "steps_total": self.run.train.steps, "attempt": st.attempt, "phase": st.phase,
            "paused": st.paused, "tokens": self.history.total_tokens(),
            "tokens_per_s": sum(r["tokens"] for r in recent) / span if span > 0 else 0.0,
            "loss": shown_float(steps[-1]["loss"], "steps.loss") if steps else None,
            "history": [{"step": r["step"], "loss": shown_float(r["loss"], "steps.loss"), "tokens": r["tokens"],
                         "grad_norm": shown_float(r["grad_norm"], "steps.grad_norm"),
                         "seconds": r["closed"] - r["opened"], "attempts": r["attempts"],
                         "stages": stored_json(r["detail"], {}, "steps.detail")} for r in steps],
            "loss_curve": self.history.loss_curve(st.step),
            "workers": self._workers(now), "stages": self._stages(),
            "plan": self._plan(self.history.median_seconds()), "liveness": self.guard.status(),
            "tickets": {**self.tickets.counts(st.step), **self.tickets.exactly_once_counts(),
                        "exactly_once_violations": self.tickets.violations()},
            "events": self.events.recent(50), "plan_version": st.plan_version,
            "event_counts": self.events.counts(), "restore_epoch": st.restore_epoch,
            "replicas_per_stage": self.run.pipeline.replicas_per_stage,
            "stage_link_tls": self.run.link.tls == "on",
            # the open attempt's loss scale; None: it runs unscaled (fp32/bf16 members)
            "loss_scale": LossScaleBook(self.db, self.events, self.run).of_attempt(st.step, st.attempt),
            "verification": {**CommitmentBook(self.db, self.events).counts(),
                             **SpotCheckBook(self.db, self.events, self.run).counts()},
            "checkpoints": {"store": self.run.coordinator.store_root,
                            "latest_complete": self.checkpoints.latest_complete(), "steps": self.checkpoints.steps()},
        }
        return self._with_operator_fields(status, now)

    def _workers(self, now: float) -> list[dict]:
        latency, drains = self.measurements.coordinator_latency_ms(), self.state.drains()
        averaging = self.measurements.averaging_mbit_stored()
        parsed = self.parsed
        parsed.next_build()
        return [{"id": r["id"], "name": r["name"], "address": r["address"], "stage": r["stage"], "state": r["state"],
                 "last_heartbeat_s": round(now - r["last_heartbeat"], 3),
                 "device": parsed.device(r["device"]), "metrics": parsed.metrics(r["metrics"]),
                 "tickets_done": r["tickets_done"],
                 "coordinator_latency_ms": latency.get(r["id"]), "averaging_mbit": averaging.get(r["id"]),
                 "joined": r["joined"],
                 "drain_requested": r["id"] in drains and r["state"] in ALIVE_STATES}
                for r in self.workers.all()]

    def _stages(self) -> list[dict]:
        live, members = self.workers.stage_workers(), self.state.members()
        return [{"index": i, "start_layer": s.start, "end_layer": s.end, "embed": s.embed, "head": s.head,
                 "workers": [w["id"] for w in live.get(i, [])], "members": members.get(i, [])}
                for i, s in enumerate(self.planner.plan)]

    def _with_operator_fields(self, status: dict, now: float) -> dict:
        """What the dashboard and the operator CLI show beyond the ledger's own facts."""
        from gptjt_core.optim import lr_at

        run = self.run
        target = run.train.steps * run.train.global_batch * run.train.seq_len
        recent = [h["seconds"] for h in status["history"][-5:]]
        if status["phase"] == "done":
            eta = 0.0
        elif status["tokens_per_s"] > 0:
            eta = max(0.0, target - status["tokens"]) / status["tokens_per_s"]
        else:
            eta = None
        replicas = {st["index"]: max(1, len(st["workers"])) for st in status["stages"]}
        straggler, worst = None, 0.0
        for w in status["workers"]:
            m = w["metrics"]
            rate, busy = m.get("micro_batches_per_s", 0.0), m.get("busy_fraction", 0.0)
            # compute seconds per micro-batch; the stage's replicas share its micro-batches
            w["seconds_per_micro_batch"] = busy / rate if rate > 0 else None
            if w["stage"] >= 0 and w["state"] in ALIVE_STATES and w["seconds_per_micro_batch"]:
                load = w["seconds_per_micro_batch"] / replicas.get(w["stage"], 1)
                if load > worst:
                    straggler, worst = w["id"], load
        step = self.state.step
        status.update(
            now=now, tokens_target=target, eta_s=eta, measured_step_s=sum(recent) / len(recent) if recent else None,
            straggler=straggler, lr=lr_at(min(step, max(run.train.steps - 1, 0)), run.optim, run.train.steps),
            global_batch=run.train.global_batch, seq_len=run.train.seq_len, notable_events=self.events.notable(),
            join_tokens=self.tokens.listing(),
            current_step_tickets=self.tickets.of_attempt(step, self.state.attempt))
        return status

    def _plan(self, measured_step_s: float | None) -> dict:
        """The `plan` object (docs/cli.md): the stage plan in force, the pending one, what moved."""
        planner, db = self.planner, self.db
        predicted, last, pending = db.meta("predicted_step_s"), db.meta("last_replan"), planner.pending
        return {"placement": self.run.scheduler.placement,
                "ranges": [[s.start, s.end] for s in planner.plan],
                "predicted_step_s": float(predicted) if predicted is not None else None,
                "measured_step_s": measured_step_s,
                "last_replan": json.loads(last) if last else None,
                "pending": pending,
                "pending_ranges": [[s.start, s.end] for s in planner.pending_stages()] if pending else [],
                "layers_moved_total": int(db.meta("layers_moved_total") or 0),
                "reload_s": planner.stall.reload_s(),
                "standby_why": db.json_meta("standby_why", {}),
                "min_workers": self.run.scheduler.min_workers,
                "measured_workers": self.measurements.measured_workers()}
