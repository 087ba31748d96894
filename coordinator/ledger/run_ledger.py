"""RunLedger: the coordinator's one view of the run, composed of the ledger's stores over one connection.

The gRPC server and the dashboard call only this facade. Each public call that changes
anything is one transaction; inside it the step protocol and recovery move the run, the stores
(workers, tickets, checkpoints, reports, history) record facts and never call back. The clock is
injected (tests drive time); a restart reads everything back from the ledger (SQLite/PostgreSQL)."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptjt_core.config import RunConfig
from gptjt_core.stage_spec import StageSpec

from ..cost_model import ModelShape
from .assignments import AssignmentView
from .averaging_rounds import AveragingRounds
from .checkpoints import CheckpointIndex
from .commitments import CommitmentBook, Submitted
from .db import ALIVE_STATES, LedgerDB
from .errors import LedgerError
from .events import EventLog, released_event
from .history import StepHistory
from .liveness_guard import LivenessGuard
from .measurements import Measurements
from .operator_requests import OperatorRequests
from .planning import StagePlanner
from .recovery import StepRecovery
from .reports import ReportBook
from .retention import Retention
from .run_fingerprint import run_fingerprint
from .spot_checks import SpotCheckBook
from .status import StatusView
from .step_state import APPLYING, WAITING, StepState
from .steps import StepProtocol
from .tickets import TicketRow, TicketBook
from .tokens import TokenStore, hash_token, new_session_secret
from .workers import WorkerRegistry


class RunLedger:
    """All of the coordinator's state; the gRPC server is a thin adapter over it."""

    def __init__(self, path: str | Path | LedgerDB, run: RunConfig, plan: list[StageSpec],
                 clock: Callable[[], float] = time.time,
                 stored: list[tuple[int, StageSpec, str]] | None = None, shape: ModelShape | None = None):
        """`plan`: the stages before any worker is measured. `stored`: what the checkpoint store
        already holds (step, stage, path); a new ledger with coordinator.resume_from_store records
        it and starts from its newest complete step. `shape`: the model's parameter counts, for
        the cost-model scheduler (else the plan stays `plan`, filled in join order). `path`: a SQLite
        file, a postgresql:// URL, or a LedgerDB leading one (coordinator/standby.py)."""
        db = self._compose(path if isinstance(path, LedgerDB) else LedgerDB(path, clock), run, plan, shape)
        with db.tx():
            fingerprint, stored_fp = run_fingerprint(run), db.meta("fingerprint")
            if stored_fp is None:
                self._start_new(fingerprint, plan, stored or [])
            elif stored_fp != fingerprint:
                raise LedgerError(f"{db.where} holds another run (fingerprint {stored_fp}, this config "
                                  f"{fingerprint}); model, data, batch or stage count changed. Use a new "
                                  "coordinator.state_path for a new run")
            else:
                self._resume()

    def _compose(self, db: LedgerDB, run: RunConfig, plan: list[StageSpec], shape: ModelShape | None) -> LedgerDB:
        """The stores and the step machine over one connection."""
        self.run, self.shape, self.db = run, shape, db
        self.events, self.state = EventLog(db), StepState(db)
        self.tokens = TokenStore(db, self.events)
        self.workers = WorkerRegistry(db, self.events)
        self.measurements = Measurements(db, self.events, run.scheduler)
        self.tickets = TicketBook(db, self.events, run)
        self.reports = ReportBook(db)
        self.history = StepHistory(db)
        self.checkpoints = CheckpointIndex(db, self.events, plan[-1].end, run.coordinator)
        self.planner = StagePlanner(db, self.events, self.workers, self.measurements, self.state, run, shape, plan)
        self.commitments = CommitmentBook(db, self.events)
        self.spot_checks = SpotCheckBook(db, self.events, run, None, self.checkpoints, lambda: self.planner.plan)
        self.protocol = StepProtocol(db, self.events, self.state, self.workers, self.tickets, self.reports,
                                     self.history, self.measurements, run, lambda: self.planner.plan,
                                     self.commitments, self.spot_checks, self.planner.stall)
        self.averaging_rounds = AveragingRounds(self.planner, self.reports)
        self.recovery = StepRecovery(self.events, self.state, self.workers, self.tickets, self.reports, self.history,
                                     self.checkpoints, self.planner, self.protocol)
        self.guard = LivenessGuard(db, self.events, self.state, self.workers, self.tickets, self.reports,
                                   self.protocol, self.recovery, run)
        self.views = AssignmentView(self.state, self.workers, self.planner, self.measurements, self.protocol.loss_scales,
                                    self.history)
        self.status_view = StatusView(run, db, self.events, self.state, self.workers, self.tickets, self.checkpoints,
                                      self.history, self.planner, self.guard, self.measurements, self.tokens)
        self.operator = OperatorRequests(db, self.events, self.state, self.workers)
        self.retention = Retention(db, run.coordinator, self.measurements)
        return db

    def _start_new(self, fingerprint: str, plan: list[StageSpec], stored: list[tuple[int, StageSpec, str]]) -> None:
        run = self.run
        self.db.set_meta("fingerprint", fingerprint)
        self.state.initialise()
        self.planner.save(plan)
        self.events.record("run_created", f"run {run.name!r}: {run.train.steps} steps of {run.train.global_batch} "
                           f"sequences, {len(plan)} stages")
        if run.coordinator.resume_from_store:
            for step, spec, where in stored:
                self.checkpoints.record(step, spec, where)
        elif stored:
            # Files of an earlier run must never be mistaken for this run's checkpoints.
            self.events.record("store_not_empty", f"the checkpoint store already holds {len(stored)} stage file(s); "
                               "ignored (set coordinator.resume_from_store to start from them)")
        start = self.checkpoints.latest_complete()
        if run.coordinator.resume_from_store and start:
            self.state.step = start
            self.state.restore(start, from_store=True)
            self.events.record("resumed_from_store", f"starting at step {start} from the checkpoint store, "
                               f"re-sliced into {len(plan)} stages")

    def _resume(self) -> None:
        """Restart: give every live worker one timeout of grace to reconnect."""
        self.workers.grant_grace()
        self.tickets.audit_unaudited()  # a ledger from before verdicts were kept
        # The phase's deadline restarts too: its workers had no coordinator to report to.
        self.state.restart_phase_clock()
        self.events.record("coordinator_restarted", f"resuming at step {self.step} ({self.phase})")

    # -- where the run stands ------------------------------------------------------------
    path = property(lambda self: self.db.path)
    clock = property(lambda self: self.db.clock)
    version = property(lambda self: self.db.version)  # bumped by every transaction (Watch streams)
    plan = property(lambda self: self.planner.plan)
    step = property(lambda self: self.state.step)
    attempt = property(lambda self: self.state.attempt)
    phase = property(lambda self: self.state.phase)
    plan_version = property(lambda self: self.state.plan_version)
    restore_epoch = property(lambda self: self.state.restore_epoch)
    paused = property(lambda self: self.state.paused)

    def global_grad_norm(self) -> float:
        return self.state.grad_norm

    # -- workers -------------------------------------------------------------------------
    def check_token(self, token: str) -> bool:
        return self.tokens.check(token)

    def join(self, name: str, address: str, device: dict, token_id: str = "") -> dict:
        """Register a new worker, admitted by join token `token_id`, and give it a stage if one is
        free. The row comes back with "session": the worker's session secret, shown this once
        (the ledger keeps its hash; every later call of the worker presents it)."""
        secret = new_session_secret()
        with self.db.tx():
            worker_id = self.workers.add(name, address, device, hash_token(secret), token_id)
            self.planner.replan(f"{worker_id} joined")
            return {**dict(self.workers.row(worker_id)), "session": secret}

    def session_valid(self, worker_id: str, secret: str) -> bool:
        """Is `secret` the session of live worker `worker_id`? (Constant-time; a worker declared
        dead or gone has no session any more.)"""
        stored = self.workers.session_of(worker_id) if worker_id else None
        return bool(stored and secret) and hmac.compare_digest(stored, hash_token(secret))

    def heartbeat(self, worker_id: str, state: str, metrics: dict, loaded_epoch: int = -1,
                  position: int = -1, device: dict | None = None, links: list[dict] | None = None,
                  coordinator_rtt_ms: float = 0.0, dht_maddrs: list[str] | None = None) -> bool:
        """Record liveness; False if the worker is unknown or was declared dead (re-join).
        `device`: re-measured at the run's dtype; `links`: {address, latency_ms, mbit,
        measured_unix_s} the worker measured towards other stage servers. Either re-plans.
        `dht_maddrs`: its averager's DHT peer (see worker_dht_peers)."""
        row = self.workers.row(worker_id)
        if row is None or row["state"] not in ALIVE_STATES:
            return False
        new_state = state if state in ALIVE_STATES else row["state"]
        if row["stage"] < 0 and new_state != "draining":
            new_state = "standby"
        structural = (new_state, loaded_epoch, position) != (row["state"], row["loaded_epoch"], row["position"])
        # A routine beat (only liveness and metrics move) is quiet: no Watch stream shows those.
        quiet = not structural and json.dumps(dht_maddrs or []) == (row["dht_maddrs"] or "[]")
        with self.db.tx(quiet=quiet):
            self.workers.beat(worker_id, new_state, metrics, loaded_epoch, position, dht_maddrs or [])
            if new_state != row["state"]:
                self.events.record("worker_state", f"{worker_id}: {row['state']} -> {new_state}")
            if structural:
                self.state.bump_plan_version()  # peers' addresses may change
                self.protocol.maybe_open()
                self.protocol.admit_to_open_step(worker_id)
        if coordinator_rtt_ms > 0:
            self.measurements.record_coordinator_rtt(worker_id, coordinator_rtt_ms)
        if device or links:  # after the liveness update, so a re-plan's assignment is not overwritten
            with self.db.tx():
                changed = self.measurements.record(worker_id, self.workers.row(worker_id), device, links or [])
                if changed:
                    self.planner.replan("new measurement: " + "; ".join(changed))
        return True

    def leave(self, worker_id: str) -> None:
        with self.db.tx():
            if self.workers.row(worker_id) is not None:
                self.recovery.drop_worker(worker_id, "left", "worker_left")

    def declare_dead(self, worker_id: str, why: str) -> None:
        """A peer reported this worker unreachable and the coordinator's probe confirmed it."""
        with self.db.tx():
            row = self.workers.row(worker_id)
            if row is not None and row["state"] in ALIVE_STATES:
                self.events.record("worker_unreachable", f"{worker_id} ({row['name']}): {why}")
                self.recovery.drop_worker(worker_id, "dead", "worker_dead")

    def reap(self) -> list[str]:
        """Declare workers silent past the heartbeat timeout dead (returns their ids), run a merged
        re-plan that is due, let a waiting step open, and apply the remedy of a late phase."""
        dead = self.workers.silent_since(self.db.clock() - self.run.coordinator.heartbeat_timeout_s)
        if dead:
            with self.db.tx():
                for worker_id in dead:
                    self.recovery.drop_worker(worker_id, "dead", "worker_dead")
        if self.phase == WAITING or self.planner.replan_due:  # (a joiner's grace may have run out)
            with self.db.tx():
                self.planner.replan_if_due()
                self.protocol.maybe_open()
        stall = self.guard.judge()
        if stall is not None:
            with self.db.tx():
                self.guard.apply(stall)
        return dead

    def prune(self) -> tuple[int, int]:
        """Let go of workers long gone and the oldest events (retention.py); (workers, events)."""
        with self.db.tx():
            return self.retention.prune()

    def worker(self, worker_id: str) -> dict | None:
        return dict(row) if (row := self.workers.row(worker_id)) is not None else None

    def worker_at(self, address: str) -> str | None:
        return self.workers.at(address)

    def worker_dht_peers(self, worker_id: str = "", limit: int = 8) -> list[str]:
        return self.workers.dht_peers(worker_id, limit)

    def links_to_measure(self, worker_id: str) -> list[str]:
        return [address for address, _ in self.views.links_to_measure(worker_id)]

    def held_out(self) -> dict[str, int]:
        return self.state.held_out()

    # -- tickets and the step protocol ---------------------------------------------------
    @contextmanager
    def watched_tx(self) -> Iterator[None]:
        """A transaction that wakes Watch streams only if it changed what they show."""
        with self.db.tx() as t:
            before = self.state.watched()
            yield
            t.quiet = self.state.watched() == before

    def lease(self, worker_id: str, max_tickets: int) -> tuple[list[TicketRow], str]:
        reason = self.protocol.why_no_lease(worker_id)
        if reason:
            return [], reason
        with self.watched_tx():  # tickets are not in any RunState
            rows = self.protocol.lease(worker_id, max_tickets)
        return rows, "" if rows else "every ticket of the step is leased"

    def commit(self, worker_id: str, ticket_id: int, attempt: int, loss: float, tokens: int) -> str:
        """Count a finished micro-batch once. Returns committed / already_committed / stale / not_leased."""
        with self.watched_tx():  # quiet unless it closed the phase
            return self.protocol.commit(worker_id, ticket_id, attempt, loss, tokens)

    def release(self, worker_id: str, ticket_ids: list[int], reason: str = "") -> int:
        with self.watched_tx():
            n = self.tickets.release(worker_id, ticket_ids)
            if n:
                self.events.record(*released_event(worker_id, n, reason))
        return n

    def report(self, worker_id: str, step: int, attempt: int, kind: str, grad_norm_sq: float = 0.0,
               micro_batches: int = 0, group_weight: float = 0.0, digest: str = "",
               commitments: list[Submitted] = ()) -> bool:
        """A member replica reports its part of the step protocol for (step, attempt)."""
        if not self.protocol.accepts(worker_id, step, attempt, kind):
            return False
        with self.db.tx():
            timed = self.averaging_rounds.completed_by(worker_id, kind)
            if self.protocol.report(worker_id, kind, grad_norm_sq, micro_batches, group_weight, digest, commitments):
                self.recovery.after_close()
            self.averaging_rounds.record(timed)
        return True

    def answer_check(self, verifier: str, check_id: int, recomputed, unable: str) -> str:
        """A verifier's answer (a Commitment, or None and why); returns the verdict."""
        with self.db.tx():
            verdict, outvoted = self.spot_checks.answer(verifier, check_id, recomputed, unable)
            if outvoted is not None:
                self.recovery.quarantine(outvoted.worker, outvoted.evidence)
            return verdict

    def averaging_failed(self, worker_id: str, step: int, attempt: int, detail: str) -> bool:
        with self.db.tx():
            return self.guard.averaging_failed(worker_id, step, attempt, detail)

    # -- checkpoints ---------------------------------------------------------------------
    def record_checkpoint(self, step: int, spec: StageSpec, path: str, declared: tuple = ()) -> list[int]:
        """Record a stage's file in the store (declared: (nbytes, sha256) of one its worker wrote into a
        shared store). Returns the steps forgotten under `coordinator.keep_checkpoints`: the caller
        deletes their files (after the ledger: a crash in between orphans files, never the ledger)."""
        with self.db.tx():
            was_complete = self.checkpoints.record(step, spec, path, *declared)
            if not self.checkpoints.is_complete(step):
                return []
            if not was_complete:  # once a step, though a stage may save it again
                self.events.record("checkpoint_complete", f"step {step}: every stage is in the store")
            self.recovery.maybe_apply_pending(step)
            return self.checkpoints.forget_old(self._restoring())

    def checkpoint_refusal(self, worker_id: str, step: int, spec: StageSpec) -> str:
        """Why `worker_id` may not upload `spec` at `step` ("" if it may): only a live worker that
        holds that very stage, for the state after the step it is applying, or the open step's
        state (a last replica leaving)."""
        st, row = self.state, self.workers.row(worker_id)
        if row is None or row["state"] not in ALIVE_STATES:
            return f"worker {worker_id!r} is not a live worker of this run"
        if row["stage"] < 0:
            return f"worker {worker_id} holds no stage"
        held = self.planner.plan[row["stage"]]
        if held != spec:
            return (f"worker {worker_id} holds stage {row['stage']} = layers {held.start}-{held.end}, not layers "
                    f"{spec.start}-{spec.end} (embed {spec.embed}, head {spec.head})")
        if not (step == st.step + 1 and st.phase == APPLYING) and step != st.step:
            return (f"step {step}: the run is at step {st.step} ({st.phase}); a stage saves the state after the step "
                    "it is applying, or the open step's state when its last replica leaves")
        if worker_id not in st.members().get(row["stage"], []) and not st.is_holder(row):
            return f"worker {worker_id} does not hold stage {row['stage']}'s current state"
        return ""

    def _restoring(self) -> int | None:
        """The last restore's step while a stage worker may still read it from the store (even after it opened)."""
        st = self.state
        loading = any(r["loaded_epoch"] != st.restore_epoch for ws in self.workers.stage_workers().values() for r in ws)
        return st.restore_step if loading and st.restore_from_store else None

    # -- views ---------------------------------------------------------------------------
    def assignment(self, worker_id: str) -> dict:
        return self.views.assignment(worker_id)

    def run_state(self, worker_id: str) -> dict:
        return self.views.run_state(worker_id)

    def status(self) -> dict:
        return self.status_view.status()

    def loss_curve(self) -> list[dict]:
        return self.history.loss_curve(self.step)

    def ticket_counts(self) -> dict:
        return self.tickets.counts(self.step)

    def exactly_once_counts(self) -> dict:
        return self.tickets.exactly_once_counts()

    def exactly_once_violations(self) -> list[str]:
        return self.tickets.violations()

    def audit_exactly_once(self) -> list[str]:
        return self.tickets.audit_all(self.history.closed_steps())

    # -- the operator --------------------------------------------------------------------
    def set_paused(self, paused: bool) -> dict:
        with self.db.tx():
            return self.operator.set_paused(paused)

    def lift_quarantine(self, worker_id: str) -> dict:
        with self.db.tx():
            return self.operator.lift_quarantine(worker_id)

    def request_drain(self, ref: str) -> dict:
        with self.db.tx():
            return self.operator.request_drain(ref)

    def drain_requested(self, worker_id: str) -> bool:
        return worker_id in self.state.drains()

    def create_token(self) -> dict:
        with self.db.tx():
            return self.tokens.create()

    def revoke_token(self, ref: str, end_sessions: bool = False) -> dict:
        """Refuse new joins with a token; with end_sessions, also end the sessions of the live
        workers it admitted (they are dropped as if they had left; their stages recover)."""
        self.tokens.find(ref)  # refusals happen outside the transaction, as reads
        with self.db.tx():
            result = self.tokens.revoke(ref)
            ended = self.workers.admitted_by(result["id"]) if end_sessions else []
            for worker_id in ended:
                self.recovery.drop_worker(worker_id, "left", "session_ended")
        return {**result, "sessions_ended": ended}

    def join_tokens(self) -> list[dict]:
        return self.tokens.listing()
