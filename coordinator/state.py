"""The run's durable ledger in SQLite (WAL): workers, stage assignment, tickets, steps, events.

Every mutation is one transaction, so a `kill -9` between two calls loses nothing and a
restart continues where the ledger stands. The clock is injected (tests drive time).

The step protocol, exactly once:
  OPEN         tickets of (step, attempt) are leased by stage 0 and committed once each
  ACCUMULATED  all committed; each stage reports its gradient norm^2
  APPLYING     the global norm is known; each stage applies its optimizer step
  -> step + 1, OPEN again (or DONE).

A stage that loses its worker loses its state. If the store holds that stage at the
current step (a drained worker saves before leaving), a newcomer loads it and the step
restarts (attempt + 1: the step's partial gradients are gone). Otherwise the run rolls
back to the newest step that the store covers completely (or to the initial weights):
steps after it are undone and re-run on the same data, and every stage reloads. Each
change of what stages must hold bumps `restore_epoch`; a step opens only when every stage
worker is READY with the current epoch loaded. So every closed step counts each of its
micro-batches exactly once, and the weights always correspond to the closed steps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptjt_core.config import RunConfig
from gptjt_core.data import step_micro_batches
from gptjt_core.model import StageSpec

WAITING, OPEN, ACCUMULATED, APPLYING, DONE = "waiting", "open", "accumulated", "applying", "done"
ALIVE_STATES = ("loading", "ready", "standby", "draining")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS workers (
  id TEXT PRIMARY KEY, name TEXT, address TEXT, device TEXT, stage INTEGER NOT NULL DEFAULT -1,
  state TEXT NOT NULL, joined REAL NOT NULL, last_heartbeat REAL NOT NULL, metrics TEXT,
  tickets_done INTEGER NOT NULL DEFAULT 0,
  loaded_epoch INTEGER NOT NULL DEFAULT -1);  -- the restore epoch whose state its stage holds
CREATE TABLE IF NOT EXISTS tickets (
  id INTEGER PRIMARY KEY, step INTEGER NOT NULL, attempt INTEGER NOT NULL, idx INTEGER NOT NULL,
  shard INTEGER NOT NULL, offset INTEGER NOT NULL, state TEXT NOT NULL, worker TEXT,
  leased_at REAL, committed_at REAL, loss REAL, tokens INTEGER,
  leases INTEGER NOT NULL DEFAULT 0,  -- times handed to a worker
  issues INTEGER NOT NULL DEFAULT 0,  -- times put back for re-issue (death, release, step restart)
  UNIQUE (step, attempt, idx));
CREATE INDEX IF NOT EXISTS tickets_by_step ON tickets (step, attempt, state);
CREATE TABLE IF NOT EXISTS reports (
  step INTEGER NOT NULL, attempt INTEGER NOT NULL, stage INTEGER NOT NULL, kind TEXT NOT NULL,
  worker TEXT NOT NULL, grad_norm_sq REAL, PRIMARY KEY (step, attempt, stage, kind));
CREATE TABLE IF NOT EXISTS steps (
  step INTEGER PRIMARY KEY, attempts INTEGER NOT NULL, loss REAL NOT NULL, tokens INTEGER NOT NULL,
  grad_norm REAL NOT NULL, opened REAL NOT NULL, closed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
  step INTEGER NOT NULL, start_layer INTEGER NOT NULL, end_layer INTEGER NOT NULL, embed INTEGER NOT NULL,
  head INTEGER NOT NULL, path TEXT NOT NULL, ts REAL NOT NULL, PRIMARY KEY (step, start_layer, end_layer));
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""


class LedgerError(RuntimeError):
    """The ledger file belongs to another run, or a request contradicts the ledger."""


@dataclass(frozen=True)
class TicketRow:
    id: int
    step: int
    attempt: int
    idx: int
    shard: int
    offset: int


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "gptjt_" + secrets.token_urlsafe(24)


def run_fingerprint(run: RunConfig) -> str:
    """What must not change across a restart: the model, data order, batch and stages."""
    key = {"model": run.model.source, "data": run.to_dict()["data"], "ul2": run.to_dict()["ul2"],
           "seed": run.train.seed, "global_batch": run.train.global_batch,
           "micro_batch": run.train.micro_batch, "seq_len": run.train.seq_len,
           "num_stages": run.pipeline.num_stages}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class RunLedger:
    """All of the coordinator's state; the gRPC server is a thin adapter over it."""

    def __init__(self, path: str | Path, run: RunConfig, plan: list[StageSpec],
                 clock: Callable[[], float] = time.time,
                 stored: list[tuple[int, StageSpec, str]] | None = None):
        """`stored`: what the checkpoint store already holds (step, stage, path). A new ledger
        with coordinator.resume_from_store records it and starts from its newest complete step."""
        self.run, self.plan, self.clock = run, plan, clock
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # survives kill -9 (not power loss)
        self.db.executescript(SCHEMA)
        self.version = 0  # bumped on every change that workers should see (Watch)
        with self._tx():
            fingerprint = run_fingerprint(run)
            stored_fp = self._meta("fingerprint")
            if stored_fp is None:
                self._set_meta("fingerprint", fingerprint)
                self._set_meta("step", 0)
                self._set_meta("attempt", 0)
                self._set_meta("phase", WAITING)
                self._set_meta("plan_version", 1)
                self._set_meta("paused", 0)
                self._set_meta("restore_epoch", 0)
                self._set_meta("restore_step", 0)
                self._set_meta("restore_from_store", 0)
                self._event("run_created", f"run {run.name!r}: {run.train.steps} steps of "
                            f"{run.train.global_batch} sequences, {len(plan)} stages")
                if run.coordinator.resume_from_store:
                    for step, spec, where in stored or []:
                        self._record_checkpoint(step, spec, where)
                elif stored:
                    # Files of an earlier run must never be mistaken for this run's checkpoints.
                    self._event("store_not_empty", f"the checkpoint store already holds {len(stored)} stage "
                                "file(s); ignored (set coordinator.resume_from_store to start from them)")
                start = self._latest_complete()
                if run.coordinator.resume_from_store and start:
                    self._set_meta("step", start)
                    self._set_meta("restore_epoch", 1)
                    self._set_meta("restore_step", start)
                    self._set_meta("restore_from_store", 1)
                    self._event("resumed_from_store", f"starting at step {start} from the checkpoint store, "
                                f"re-sliced into {len(plan)} stages")
            elif stored_fp != fingerprint:
                raise LedgerError(f"{self.path} holds another run (fingerprint {stored_fp}, this config "
                                  f"{fingerprint}); model, data, batch or stage count changed. Use a new "
                                  "coordinator.state_path for a new run")
            else:
                # Restart: give every live worker one timeout of grace to reconnect.
                self.db.execute("UPDATE workers SET last_heartbeat=? WHERE state IN (%s)"
                                % ",".join("?" * len(ALIVE_STATES)), (self.clock(), *ALIVE_STATES))
                self._event("coordinator_restarted", f"resuming at step {self.step} ({self.phase})")

    # -- plumbing ----------------------------------------------------------------------
    def _tx(self):
        ledger = self

        class Tx:
            def __enter__(self):
                ledger.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                ledger.db.execute("ROLLBACK" if exc_type else "COMMIT")
                if not exc_type:
                    ledger.version += 1

        return Tx()

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, str(value)))

    def _event(self, kind: str, detail: str) -> None:
        self.db.execute("INSERT INTO events(ts, kind, detail) VALUES(?, ?, ?)", (self.clock(), kind, detail))

    @property
    def step(self) -> int:
        return int(self._meta("step"))

    @property
    def attempt(self) -> int:
        return int(self._meta("attempt"))

    @property
    def phase(self) -> str:
        return self._meta("phase")

    @property
    def plan_version(self) -> int:
        return int(self._meta("plan_version"))

    @property
    def restore_epoch(self) -> int:
        return int(self._meta("restore_epoch"))

    @property
    def paused(self) -> bool:
        return self._meta("paused") == "1"

    # -- tokens ------------------------------------------------------------------------
    def check_token(self, token: str) -> bool:
        """Constant-time comparison of the token's hash against every valid one."""
        presented = hash_token(token or "")
        ok = False
        for (stored,) in self.db.execute("SELECT hash FROM tokens WHERE revoked=0"):
            ok |= hmac.compare_digest(presented, stored)
        return ok and bool(token)

    # -- workers -----------------------------------------------------------------------
    def join(self, name: str, address: str, device: dict, worker_id: str = "") -> dict:
        """Register a worker (or re-register a known one) and give it a stage if one is free."""
        now = self.clock()
        with self._tx():
            row = self._worker(worker_id) if worker_id else None
            if row is not None and row["state"] in ALIVE_STATES:
                # Reconnect after a coordinator restart: keep its stage.
                self.db.execute("UPDATE workers SET last_heartbeat=?, address=? WHERE id=?",
                                (now, address, worker_id))
                self._event("worker_reconnected", f"{worker_id} ({name}) reconnected, stage {row['stage']}")
                return dict(self._worker(worker_id))
            worker_id = uuid.uuid4().hex[:12]
            self.db.execute("INSERT INTO workers(id, name, address, device, state, joined, last_heartbeat) "
                            "VALUES(?, ?, ?, ?, 'standby', ?, ?)", (worker_id, name, address, json.dumps(device), now, now))
            self._event("worker_joined", f"{worker_id} ({name}) at {address}")
            self._fill_vacancies()
            return dict(self._worker(worker_id))

    def _worker(self, worker_id: str):
        return self.db.execute("SELECT * FROM workers WHERE id=?", (worker_id,)).fetchone()

    def stage_workers(self) -> dict[int, sqlite3.Row]:
        rows = self.db.execute("SELECT * FROM workers WHERE stage>=0 AND state IN (%s)"
                               % ",".join("?" * len(ALIVE_STATES)), ALIVE_STATES).fetchall()
        return {r["stage"]: r for r in rows}

    def _fill_vacancies(self) -> None:
        """Give each stage without a live worker the longest-waiting standby worker."""
        taken = self.stage_workers()
        for stage in range(len(self.plan)):
            if stage in taken:
                continue
            row = self.db.execute("SELECT id FROM workers WHERE state='standby' AND stage=-1 "
                                  "ORDER BY joined LIMIT 1").fetchone()
            if row is None:
                return
            self.db.execute("UPDATE workers SET stage=?, state='loading' WHERE id=?", (stage, row["id"]))
            self._set_meta("plan_version", self.plan_version + 1)
            spec = self.plan[stage]
            self._event("stage_assigned", f"stage {stage} (layers {spec.start}-{spec.end}) -> {row['id']}")

    def heartbeat(self, worker_id: str, state: str, metrics: dict, loaded_epoch: int = -1) -> bool:
        """Record liveness; False if the worker is unknown or was declared dead (re-join)."""
        row = self._worker(worker_id)
        if row is None or row["state"] not in ALIVE_STATES:
            return False
        new_state = state if state in ALIVE_STATES else row["state"]
        if row["stage"] < 0 and new_state != "draining":
            new_state = "standby"
        with self._tx():
            self.db.execute("UPDATE workers SET last_heartbeat=?, state=?, metrics=?, loaded_epoch=? WHERE id=?",
                            (self.clock(), new_state, json.dumps(metrics), loaded_epoch, worker_id))
            if new_state != row["state"]:
                self._event("worker_state", f"{worker_id}: {row['state']} -> {new_state}")
            if new_state != row["state"] or loaded_epoch != row["loaded_epoch"]:
                self._maybe_open()
        return True

    def leave(self, worker_id: str) -> None:
        with self._tx():
            if self._worker(worker_id) is not None:
                self._drop_worker(worker_id, "left", "worker_left")

    def reap(self) -> list[str]:
        """Declare workers silent past the heartbeat timeout dead; returns their ids."""
        deadline = self.clock() - self.run.coordinator.heartbeat_timeout_s
        rows = self.db.execute("SELECT id FROM workers WHERE last_heartbeat<? AND state IN (%s)"
                               % ",".join("?" * len(ALIVE_STATES)), (deadline, *ALIVE_STATES)).fetchall()
        dead = [r["id"] for r in rows]
        if dead:
            with self._tx():
                for worker_id in dead:
                    self._drop_worker(worker_id, "dead", "worker_dead")
        return dead

    def _drop_worker(self, worker_id: str, state: str, event: str) -> None:
        row = self._worker(worker_id)
        if row["state"] not in ALIVE_STATES:
            return
        self.db.execute("UPDATE workers SET state=? WHERE id=?", (state, worker_id))
        released = self.db.execute("UPDATE tickets SET state='pending', worker=NULL, issues=issues+1 "
                                   "WHERE worker=? AND state='leased'", (worker_id,)).rowcount
        self._event(event, f"{worker_id} ({row['name']}), stage {row['stage']}; {released} leased ticket(s) re-issued")
        if row["stage"] >= 0:
            self._set_meta("plan_version", self.plan_version + 1)
            self._event("stage_vacant", f"stage {row['stage']} has no worker; ticket issue waits")
            if self.phase != DONE:
                self._vacate(row["stage"], f"stage {row['stage']} lost worker {worker_id}")
            self._fill_vacancies()
            self._maybe_open()

    def _vacate(self, stage: int, why: str) -> None:
        """The stage's state is gone with its worker: decide what every stage must hold now."""
        step, spec = self.step, self.plan[stage]
        # In APPLYING some stages may already hold step + 1: they too must reload, so the
        # store must cover the whole model at this step, not just the lost stage.
        covered = self._is_complete(step) if self.phase == APPLYING else self._store_covers(step, spec)
        target = step if covered else (self._latest_complete() or 0)
        if target == step:  # nothing closed is lost; only the open step's partial work
            if self.phase in (OPEN, ACCUMULATED, APPLYING) and self._step_has_work():
                self._restart_step(why)
        else:
            self._rollback(target, why)
        self._set_meta("restore_epoch", self.restore_epoch + 1)
        self._set_meta("restore_step", target)
        self._set_meta("restore_from_store", int(bool(self._stored(target))))
        self._set_meta("phase", WAITING)

    def _next_attempt(self, step: int) -> int:
        return self.db.execute("SELECT COALESCE(MAX(attempt), -1) FROM tickets WHERE step=?",
                               (step,)).fetchone()[0] + 1

    def _rollback(self, target: int, why: str) -> None:
        """Undo every step from `target` on: they are re-run on the same data from its state."""
        undone = [r[0] for r in self.db.execute("SELECT step FROM steps WHERE step>=? ORDER BY step", (target,))]
        self.db.execute("DELETE FROM steps WHERE step>=?", (target,))
        self.db.execute("UPDATE tickets SET state='rolled_back' WHERE step>=? AND state!='aborted'", (target,))
        self.db.execute("DELETE FROM reports WHERE step>=?", (target,))
        self._set_meta("step", target)
        self._set_meta("attempt", self._next_attempt(target))
        self._event("rolled_back", f"{why}: run rolled back to step {target} "
                    + ("(checkpoint)" if self._stored(target) else "(the run's initial weights)")
                    + (f"; steps {undone} will be re-run" if undone else ""))

    # -- checkpoints -------------------------------------------------------------------
    def record_checkpoint(self, step: int, spec: StageSpec, path: str) -> None:
        with self._tx():
            self._record_checkpoint(step, spec, path)
            if self._is_complete(step):
                self._event("checkpoint_complete", f"step {step}: every stage is in the store")

    def _record_checkpoint(self, step: int, spec: StageSpec, path: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO checkpoints VALUES(?, ?, ?, ?, ?, ?, ?)",
                        (step, spec.start, spec.end, int(spec.embed), int(spec.head), path, self.clock()))

    def _stored(self, step: int) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM checkpoints WHERE step=?", (step,)).fetchall()

    def _store_covers(self, step: int, spec: StageSpec) -> bool:
        rows = self._stored(step)
        layers = {i for r in rows for i in range(r["start_layer"], r["end_layer"])}
        return (set(range(spec.start, spec.end)) <= layers and (not spec.embed or any(r["embed"] for r in rows))
                and (not spec.head or any(r["head"] for r in rows)))

    def _is_complete(self, step: int) -> bool:
        n_layer = self.plan[-1].end
        return self._store_covers(step, StageSpec(0, n_layer, embed=True, head=True))

    def _latest_complete(self) -> int | None:
        for (step,) in self.db.execute("SELECT DISTINCT step FROM checkpoints ORDER BY step DESC").fetchall():
            if self._is_complete(step):
                return step
        return None

    def _step_has_work(self) -> bool:
        return self.db.execute("SELECT COUNT(*) FROM tickets WHERE step=? AND attempt=? AND state!='pending'",
                               (self.step, self.attempt)).fetchone()[0] > 0

    def _restart_step(self, why: str) -> None:
        """Gradients of this attempt are gone with a stage: re-issue every ticket of the step."""
        step, attempt = self.step, self.attempt
        self.db.execute("UPDATE tickets SET state='aborted' WHERE step=? AND attempt=?", (step, attempt))
        self.db.execute("DELETE FROM reports WHERE step=? AND attempt=?", (step, attempt))
        self._set_meta("attempt", attempt + 1)
        self._create_tickets(step, attempt + 1, reissue=True)
        self._event("step_restarted", f"step {step} attempt {attempt} -> {attempt + 1}: {why}")

    # -- tickets -----------------------------------------------------------------------
    def _create_tickets(self, step: int, attempt: int, reissue: bool = False) -> None:
        for ref in step_micro_batches(step, self.run.train, self.run.data.num_shards):
            self.db.execute("INSERT INTO tickets(step, attempt, idx, shard, offset, state, issues) "
                            "VALUES(?, ?, ?, ?, ?, 'pending', ?)",
                            (step, attempt, ref.index, ref.shard, ref.offset, 1 if reissue else 0))

    def _maybe_open(self) -> None:
        """WAITING -> OPEN once every stage has a READY worker."""
        if self.phase != WAITING:
            return
        workers = self.stage_workers()
        epoch = self.restore_epoch
        if len(workers) == len(self.plan) and all(w["state"] == "ready" and w["loaded_epoch"] == epoch
                                                  for w in workers.values()):
            if self.step >= self.run.train.steps:
                self._set_meta("phase", DONE)
                return
            exists = self.db.execute("SELECT COUNT(*) FROM tickets WHERE step=? AND attempt=?",
                                     (self.step, self.attempt)).fetchone()[0]
            if not exists:
                self._create_tickets(self.step, self.attempt)
                self._set_meta("step_opened", self.clock())
            self._set_meta("phase", OPEN)
            self._event("step_open", f"step {self.step} attempt {self.attempt}")

    def lease(self, worker_id: str, max_tickets: int) -> tuple[list[TicketRow], str]:
        row = self._worker(worker_id)
        if row is None or row["state"] not in ALIVE_STATES:
            return [], "unknown or dead worker: re-join"
        if row["stage"] != 0:
            return [], f"only stage 0 leases tickets; this worker holds stage {row['stage']}"
        if self.paused:
            return [], "ticket issue is paused by the operator"
        if self.phase != OPEN:
            return [], f"step {self.step} is {self.phase}"
        with self._tx():
            rows = self.db.execute("SELECT * FROM tickets WHERE step=? AND attempt=? AND state='pending' "
                                   "ORDER BY idx LIMIT ?", (self.step, self.attempt, max(0, max_tickets))).fetchall()
            for r in rows:
                self.db.execute("UPDATE tickets SET state='leased', worker=?, leased_at=?, leases=leases+1 WHERE id=?",
                                (worker_id, self.clock(), r["id"]))
        return [TicketRow(r["id"], r["step"], r["attempt"], r["idx"], r["shard"], r["offset"]) for r in rows], \
            "" if rows else "every ticket of the step is leased"

    def commit(self, worker_id: str, ticket_id: int, attempt: int, loss: float, tokens: int) -> str:
        """Count a finished micro-batch once. Returns committed / already_committed / stale / not_leased."""
        with self._tx():
            row = self.db.execute("SELECT * FROM tickets WHERE id=?", (ticket_id,)).fetchone()
            if row is None:
                return "not_leased"
            if row["state"] == "committed":
                return "already_committed"
            if row["state"] == "aborted" or row["attempt"] != attempt:
                return "stale"
            if row["state"] != "leased" or row["worker"] != worker_id:
                return "not_leased"
            self.db.execute("UPDATE tickets SET state='committed', committed_at=?, loss=?, tokens=? WHERE id=?",
                            (self.clock(), loss, tokens, ticket_id))
            self.db.execute("UPDATE workers SET tickets_done=tickets_done+1 WHERE id=?", (worker_id,))
            left = self.db.execute("SELECT COUNT(*) FROM tickets WHERE step=? AND attempt=? AND state!='committed'",
                                   (row["step"], row["attempt"])).fetchone()[0]
            if left == 0 and self.phase == OPEN:
                self._set_meta("phase", ACCUMULATED)
                self._event("step_accumulated", f"step {self.step}: every ticket committed")
        return "committed"

    def release(self, worker_id: str, ticket_ids: list[int]) -> int:
        with self._tx():
            n = 0
            for tid in ticket_ids:
                n += self.db.execute("UPDATE tickets SET state='pending', worker=NULL, issues=issues+1 "
                                     "WHERE id=? AND worker=? AND state='leased'", (tid, worker_id)).rowcount
            if n:
                self._event("tickets_released", f"{worker_id} handed back {n} ticket(s)")
        return n

    # -- the step protocol -------------------------------------------------------------
    def report(self, worker_id: str, step: int, attempt: int, applied: bool, grad_norm_sq: float) -> bool:
        """A stage reports ACCUMULATED (norm^2) or APPLIED for (step, attempt)."""
        row = self._worker(worker_id)
        if row is None or row["stage"] < 0 or step != self.step or attempt != self.attempt:
            return False
        kind = "applied" if applied else "accumulated"
        if (applied and self.phase != APPLYING) or (not applied and self.phase != ACCUMULATED):
            return False
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO reports VALUES(?, ?, ?, ?, ?, ?)",
                            (step, attempt, row["stage"], kind, worker_id, grad_norm_sq))
            done = self.db.execute("SELECT COUNT(*), SUM(grad_norm_sq) FROM reports WHERE step=? AND attempt=? "
                                   "AND kind=?", (step, attempt, kind)).fetchone()
            if not applied and done[0] == len(self.plan):
                self._set_meta("grad_norm", float(done[1]) ** 0.5)
                self._set_meta("phase", APPLYING)
            elif applied:
                self._close_step_if_applied()
        return True

    def _close_step_if_applied(self) -> None:
        applied = self.db.execute("SELECT COUNT(*) FROM reports WHERE step=? AND attempt=? AND kind='applied'",
                                  (self.step, self.attempt)).fetchone()[0]
        if self.phase == APPLYING and applied == len(self.plan):
            self._close_step()

    def _close_step(self) -> None:
        step, attempt = self.step, self.attempt
        loss, tokens = self.db.execute("SELECT SUM(loss), SUM(tokens) FROM tickets WHERE step=? AND attempt=? "
                                       "AND state='committed'", (step, attempt)).fetchone()
        opened = float(self._meta("step_opened") or self.clock())
        self.db.execute("INSERT INTO steps VALUES(?, ?, ?, ?, ?, ?, ?)",
                        (step, attempt + 1, loss, tokens, float(self._meta("grad_norm")), opened, self.clock()))
        self._event("step_closed", f"step {step}: loss {loss:.4f}, {tokens} tokens")
        self._set_meta("step", step + 1)
        self._set_meta("attempt", self._next_attempt(step + 1))  # 0 unless a rollback re-runs it
        self._set_meta("phase", WAITING)
        self._maybe_open()

    def global_grad_norm(self) -> float:
        value = self._meta("grad_norm")
        return float(value) if value is not None else 0.0

    # -- operator ----------------------------------------------------------------------
    def assignment(self, worker_id: str) -> dict:
        """The worker's stage (or standby) and where to send its activations."""
        row = self._worker(worker_id)
        stage = row["stage"] if row is not None and row["state"] in ALIVE_STATES else -1
        out = {"stage": stage, "num_stages": len(self.plan), "next_address": ""}
        if stage >= 0:
            spec = self.plan[stage]
            out.update(start_layer=spec.start, end_layer=spec.end, embed=spec.embed, head=spec.head)
            nxt = self.stage_workers().get(stage + 1)
            if nxt is not None:
                out["next_address"] = nxt["address"]
        return out

    def run_state(self, worker_id: str) -> dict:
        return {"step": self.step, "attempt": self.attempt, "phase": self.phase,
                "global_grad_norm": self.global_grad_norm() if self.phase == APPLYING else 0.0,
                "plan_version": self.plan_version, "assignment": self.assignment(worker_id),
                "paused": self.paused, "restore_epoch": self.restore_epoch,
                "restore_step": int(self._meta("restore_step")),
                "restore_from_store": self._meta("restore_from_store") == "1"}

    def ticket_counts(self) -> dict:
        """issued: leases handed out; reissued: tickets put back after a death, a release or a
        step restart; committed: micro-batches counted (each exactly once)."""
        rows = dict(self.db.execute("SELECT state, COUNT(*) FROM tickets GROUP BY state").fetchall())
        issued, reissued = self.db.execute("SELECT COALESCE(SUM(leases), 0), COALESCE(SUM(issues), 0) "
                                           "FROM tickets").fetchone()
        return {"issued": issued, "committed": rows.get("committed", 0), "reissued": reissued,
                "leased": rows.get("leased", 0), "pending": rows.get("pending", 0),
                "aborted": rows.get("aborted", 0), "rolled_back": rows.get("rolled_back", 0)}

    def exactly_once_violations(self) -> list[str]:
        """Every closed step must count each of its micro-batches exactly once."""
        problems = []
        m = self.run.train.micro_batches_per_step
        for (step,) in self.db.execute("SELECT step FROM steps").fetchall():
            rows = self.db.execute("SELECT idx, COUNT(*) FROM tickets WHERE step=? AND state='committed' "
                                   "GROUP BY idx", (step,)).fetchall()
            if len(rows) != m or any(c != 1 for _, c in rows):
                problems.append(f"step {step}: committed micro-batches {dict(rows)} (expected each of {m} once)")
        return problems

    def status(self) -> dict:
        """The status object (`gptjt status --json`, the dashboard)."""
        now = self.clock()
        steps = self.db.execute("SELECT * FROM steps ORDER BY step").fetchall()
        tokens = sum(r["tokens"] for r in steps)
        recent = steps[-5:]
        span = (recent[-1]["closed"] - recent[0]["opened"]) if recent else 0.0
        workers = []
        for r in self.db.execute("SELECT * FROM workers ORDER BY joined").fetchall():
            workers.append({"id": r["id"], "name": r["name"], "address": r["address"], "stage": r["stage"],
                            "state": r["state"], "last_heartbeat_s": round(now - r["last_heartbeat"], 3),
                            "device": json.loads(r["device"] or "{}"), "metrics": json.loads(r["metrics"] or "{}"),
                            "tickets_done": r["tickets_done"]})
        live = self.stage_workers()
        stages = [{"index": i, "start_layer": s.start, "end_layer": s.end, "embed": s.embed, "head": s.head,
                   "workers": [live[i]["id"]] if i in live else []} for i, s in enumerate(self.plan)]
        events = [dict(r) for r in self.db.execute("SELECT * FROM events ORDER BY id DESC LIMIT 50").fetchall()]
        return {
            "run": self.run.name, "model_source": self.run.model.source, "tokenizer": self.run.data.tokenizer,
            "step": self.step, "steps_total": self.run.train.steps,
            "attempt": self.attempt, "phase": self.phase, "paused": self.paused,
            "tokens": tokens,
            "tokens_per_s": sum(r["tokens"] for r in recent) / span if span > 0 else 0.0,
            "loss": steps[-1]["loss"] if steps else None,
            "history": [{"step": r["step"], "loss": r["loss"], "tokens": r["tokens"], "grad_norm": r["grad_norm"],
                         "seconds": r["closed"] - r["opened"], "attempts": r["attempts"]} for r in steps],
            "workers": workers, "stages": stages,
            "tickets": {**self.ticket_counts(), "exactly_once_violations": self.exactly_once_violations()},
            "events": events[::-1], "plan_version": self.plan_version,
            "restore_epoch": self.restore_epoch,
            "checkpoints": {"store": self.run.coordinator.store_root, "latest_complete": self._latest_complete(),
                            "steps": [r[0] for r in self.db.execute(
                                "SELECT DISTINCT step FROM checkpoints ORDER BY step").fetchall()]},
        }


def create_token_in(path: str | Path) -> str:
    """Create a join token in the ledger at `path` (works while the coordinator runs: WAL)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        token = new_token()
        db.execute("INSERT INTO tokens(hash, created) VALUES(?, ?)", (hash_token(token), time.time()))
        db.execute("INSERT INTO events(ts, kind, detail) VALUES(?, 'token_created', 'a join token was created')",
                   (time.time(),))
        return token
    finally:
        db.close()
