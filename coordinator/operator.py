"""The operator's side of the ledger: pause/resume, drain requests, join tokens, the event log, status extras.

`OperatorLedger` is mixed into `RunLedger` (it uses the ledger's SQLite connection, clock,
transactions and events); every action is one transaction and records an event, so the
event log in the ledger file tells what an operator did, and survives a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

# Event kinds by what an operator looks for. Kinds not listed fall in "other".
EVENT_CATEGORIES = {
    "joins": ("worker_joined", "worker_reconnected"),
    "leaves": ("worker_left",),
    "deaths": ("worker_dead", "worker_unreachable"),
    "replans": ("stage_assigned", "replica_moved", "stage_vacant", "replica_admitted", "replica_lost",
                "plan_changed", "replanned"),
    "recovery": ("rolled_back", "step_restarted", "resumed_from_store", "coordinator_restarted"),
    "liveness": ("step_stuck", "averaging_failed", "worker_stuck", "replicas_reduced"),  # coordinator/liveness.py
    "checkpoints": ("checkpoint_complete", "checkpoint_saved", "checkpoints_pruned", "store_not_empty"),
    "rejected": ("poisoned_update", "step_skipped", "replicas_diverged", "update_rejected"),
    "steps": ("step_open", "step_accumulated", "step_closed"),
    "operator": ("paused", "resumed", "drain_requested", "token_created", "token_revoked", "run_created"),
    "workers": ("worker_state", "tickets_released"),
    "measurements": ("measured",),  # probed devices and links (the scheduler's inputs)
}
_CATEGORY_OF = {kind: cat for cat, kinds in EVENT_CATEGORIES.items() for kind in kinds}
# Routine events that would push the notable ones out of a short list.
ROUTINE_CATEGORIES = ("steps", "workers")
_ALIVE = ("loading", "ready", "standby", "draining")


def event_category(kind: str) -> str:
    if kind in _CATEGORY_OF:
        return _CATEGORY_OF[kind]
    if "plan" in kind:  # re-plans named otherwise by the scheduler
        return "replans"
    if kind.startswith("checkpoint"):
        return "checkpoints"
    return "other"


def token_id(token: str) -> str:
    """A join token's public id: the first 10 hex digits of its SHA-256 (what the ledger stores)."""
    return hashlib.sha256(token.encode()).hexdigest()[:10]


class OperatorError(ValueError):
    """An operator request the run cannot carry out; `code` says why (and picks the exit code)."""

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code  # "not_found" | "precondition" | "invalid"


class Unauthorized(PermissionError):
    """A missing or wrong admin token."""


class AdminToken:
    """The run's admin token: needed for every action that changes the run.

    From `--admin-token-file`, else GPTJT_ADMIN_TOKEN, else the file beside the ledger
    (`<state_path>.admin-token`, created with mode 0600 on first start)."""

    ENV = "GPTJT_ADMIN_TOKEN"

    def __init__(self, token: str, where: str):
        self._hash = hashlib.sha256(token.encode()).hexdigest()
        self.where = where  # told to callers without the token

    @classmethod
    def load(cls, state_path: str | Path, token_file: str | None = None) -> AdminToken:
        if token_file:
            token = Path(token_file).read_text().strip()
            if not token:
                raise ValueError(f"--admin-token-file {token_file} is empty; put the admin token in it")
            return cls(token, token_file)
        if os.environ.get(cls.ENV):
            return cls(os.environ[cls.ENV].strip(), f"${cls.ENV} of the coordinator")
        path = Path(f"{state_path}.admin-token")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("gptjt_admin_" + secrets.token_urlsafe(24) + "\n")
        return cls(path.read_text().strip(), str(path))

    def check(self, presented: str) -> None:
        """Raise Unauthorized (saying what to do) unless `presented` is the admin token."""
        how = f"pass --admin-token or set {self.ENV}; the coordinator keeps the token in {self.where}"
        if not presented:
            raise Unauthorized(f"this action needs the run's admin token: {how}")
        if not hmac.compare_digest(hashlib.sha256(presented.encode()).hexdigest(), self._hash):
            raise Unauthorized(f"the admin token given is not this run's: {how}")


class OperatorLedger:
    """Operator actions over RunLedger's tables (a mixin: RunLedger supplies db, clock, _tx, _event, _meta)."""

    # -- pause / resume ------------------------------------------------------------------
    def set_paused(self, paused: bool) -> dict:
        """Stop or restart ticket issue; workers see RunState.paused and stop leasing."""
        with self._tx():
            changed = self.paused != paused
            if changed:
                self._set_meta("paused", int(paused))
                self._event("paused" if paused else "resumed",
                            f"ticket issue {'paused' if paused else 'resumed'} by the operator at step {self.step}")
        return {"paused": paused, "changed": changed, "step": self.step}

    # -- drain ---------------------------------------------------------------------------
    def _drains(self) -> dict[str, float]:
        return json.loads(self._meta("drain_requested") or "{}")

    def drain_requested(self, worker_id: str) -> bool:
        return worker_id in self._drains()

    def resolve_worker(self, ref: str):
        """The worker row for an id, or for a name that exactly one live worker has."""
        if not ref:
            raise OperatorError("no worker given; `gptjt workers --coordinator HOST:PORT` lists worker ids")
        row = self._worker(ref)
        if row is not None:
            return row
        rows = self.db.execute("SELECT * FROM workers WHERE name=? AND state IN (%s)" % ",".join("?" * len(_ALIVE)),
                               (ref, *_ALIVE)).fetchall()
        if len(rows) == 1:
            return rows[0]
        live = self.db.execute("SELECT id, name FROM workers WHERE state IN (%s) ORDER BY joined"
                               % ",".join("?" * len(_ALIVE)), _ALIVE).fetchall()
        known = ", ".join(f"{r['id']} ({r['name']})" for r in live) or "none"
        if len(rows) > 1:
            raise OperatorError(f"worker name {ref!r} is shared by {len(rows)} live workers; give one of their ids "
                                f"({', '.join(r['id'] for r in rows)})", "invalid")
        raise OperatorError(f"no worker {ref!r} in this run (live workers: {known}); "
                            "`gptjt workers --coordinator HOST:PORT` lists them", "not_found")

    def request_drain(self, ref: str) -> dict:
        """Ask a worker to finish the current step and leave (it reads RunState.drain)."""
        row = self.resolve_worker(ref)
        worker_id = row["id"]
        if row["state"] not in _ALIVE:
            raise OperatorError(f"worker {worker_id} ({row['name']}) is {row['state']}; there is nothing to drain",
                                "precondition")
        warning = ""
        with self._tx():
            drains = self._drains()
            already = worker_id in drains
            if not already:
                drains[worker_id] = self.clock()
                self._set_meta("drain_requested", json.dumps(drains))
                self._event("drain_requested", f"{worker_id} ({row['name']}), stage {row['stage']}: asked to drain "
                            "by the operator")
            if row["stage"] >= 0:
                others = [w for w in self.stage_workers().get(row["stage"], []) if w["id"] != worker_id]
                standby = [r["id"] for r in self.db.execute("SELECT id FROM workers WHERE state='standby' AND "
                                                             "stage=-1").fetchall() if r["id"] not in drains]
                if not others and not standby:
                    warning = (f"stage {row['stage']} has no other replica and no worker is on standby: the run "
                               "waits for a new worker once this one leaves")
        return {"worker": worker_id, "name": row["name"], "stage": row["stage"], "drain_requested": True,
                "already_requested": already, "warning": warning}

    # -- join tokens ---------------------------------------------------------------------
    def create_token(self) -> dict:
        """A new join token; only its hash is stored, so this is the one time it is shown."""
        token = "gptjt_" + secrets.token_urlsafe(24)
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self._tx():
            self.db.execute("INSERT INTO tokens(hash, created) VALUES(?, ?)", (digest, self.clock()))
            self._event("token_created", f"join token {digest[:10]} created by the operator")
        return {"token": token, "id": digest[:10]}

    def revoke_token(self, ref: str) -> dict:
        """Revoke a join token by id (a prefix of at least 6 hex digits) or by the token itself."""
        ref = (ref or "").strip()
        if ref.startswith("gptjt_"):
            rows = self.db.execute("SELECT hash, revoked FROM tokens WHERE hash=?",
                                   (hashlib.sha256(ref.encode()).hexdigest(),)).fetchall()
            shown = "the token given"
        elif len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref.lower()):
            rows = self.db.execute("SELECT hash, revoked FROM tokens WHERE hash LIKE ?",
                                   (ref.lower() + "%",)).fetchall()
            shown = f"token id {ref!r}"
        else:
            raise OperatorError(f"{ref!r} is neither a join token (gptjt_...) nor a token id (6+ hex digits); "
                                "`gptjt token list --coordinator HOST:PORT` shows the ids")
        if not rows:
            raise OperatorError(f"no join token matches {shown}; `gptjt token list --coordinator HOST:PORT` shows "
                                "the ids", "not_found")
        if len(rows) > 1:
            raise OperatorError(f"token id {ref!r} matches {len(rows)} tokens; give more digits")
        digest = rows[0]["hash"]
        with self._tx():
            if not rows[0]["revoked"]:
                self.db.execute("UPDATE tokens SET revoked=1 WHERE hash=?", (digest,))
                self._event("token_revoked", f"join token {digest[:10]} revoked by the operator; new joins with it "
                            "are refused")
        return {"id": digest[:10], "revoked": True, "already_revoked": bool(rows[0]["revoked"])}

    def join_tokens(self) -> list[dict]:
        return [{"id": r["hash"][:10], "created": r["created"], "revoked": bool(r["revoked"])}
                for r in self.db.execute("SELECT * FROM tokens ORDER BY created")]

    # -- the event log -------------------------------------------------------------------
    def events(self, after_id: int = 0, limit: int = 50, kind: str = "") -> list[dict]:
        """Persisted events, oldest first: the newest `limit` after `after_id`, of a kind or category."""
        if kind and kind not in EVENT_CATEGORIES and kind not in _CATEGORY_OF and not self.db.execute(
                "SELECT 1 FROM events WHERE kind=? LIMIT 1", (kind,)).fetchone():
            raise OperatorError(f"no event kind or category {kind!r}; categories: {', '.join(EVENT_CATEGORIES)}")
        kinds = EVENT_CATEGORIES.get(kind, (kind,) if kind else None)
        where, args = "id > ?", [after_id]
        if kinds:
            where += " AND kind IN (%s)" % ",".join("?" * len(kinds))
            args += list(kinds)
        rows = self.db.execute(f"SELECT * FROM events WHERE {where} ORDER BY id DESC LIMIT ?",
                               (*args, limit if limit > 0 else 50)).fetchall()
        return [{**dict(r), "category": event_category(r["kind"])} for r in reversed(rows)]

    def _notable_events(self, limit: int = 50) -> list[dict]:
        routine = {k for c in ROUTINE_CATEGORIES for k in EVENT_CATEGORIES[c]}
        # By kind through the events_by_kind index: a long run's routine events (3 a step)
        # are never scanned.
        kinds = [k for (k,) in self.db.execute("SELECT DISTINCT kind FROM events").fetchall() if k not in routine]
        rows = self.db.execute("SELECT * FROM events WHERE kind IN (%s) ORDER BY id DESC LIMIT ?"
                               % ",".join("?" * len(kinds)), (*kinds, limit)).fetchall()
        return [{**dict(r), "category": event_category(r["kind"])} for r in reversed(rows)]

    # -- status extras -------------------------------------------------------------------
    def with_operator_fields(self, status: dict) -> dict:
        """Add what the dashboard and the operator CLI show beyond the ledger's own facts."""
        from gptjt_core.optim import lr_at

        run, now = self.run, self.clock()
        target = run.train.steps * run.train.global_batch * run.train.seq_len
        recent = [h["seconds"] for h in status["history"][-5:]]
        measured = sum(recent) / len(recent) if recent else None
        if status["phase"] == "done":
            eta = 0.0
        elif status["tokens_per_s"] > 0:
            eta = max(0.0, target - status["tokens"]) / status["tokens_per_s"]
        else:
            eta = None
        joined = dict(self.db.execute("SELECT id, joined FROM workers").fetchall())
        drains = self._drains()
        replicas = {st["index"]: max(1, len(st["workers"])) for st in status["stages"]}
        straggler, worst = None, 0.0
        for w in status["workers"]:
            w["joined"] = joined.get(w["id"])
            w["drain_requested"] = w["id"] in drains and w["state"] in _ALIVE
            m = w["metrics"]
            rate, busy = m.get("micro_batches_per_s", 0.0), m.get("busy_fraction", 0.0)
            # compute seconds per micro-batch; the stage's replicas share its micro-batches
            w["seconds_per_micro_batch"] = busy / rate if rate > 0 else None
            if w["stage"] >= 0 and w["state"] in _ALIVE and w["seconds_per_micro_batch"]:
                load = w["seconds_per_micro_batch"] / replicas.get(w["stage"], 1)
                if load > worst:
                    straggler, worst = w["id"], load
        for e in status["events"]:
            e["category"] = event_category(e["kind"])
        status.update(
            now=now, tokens_target=target, eta_s=eta, measured_step_s=measured, straggler=straggler,
            lr=lr_at(min(self.step, max(run.train.steps - 1, 0)), run.optim, run.train.steps),
            global_batch=run.train.global_batch, seq_len=run.train.seq_len,
            notable_events=self._notable_events(), join_tokens=self.join_tokens(),
            current_step_tickets=[dict(r) for r in self.db.execute(
                "SELECT idx, shard, offset, state, worker, leases FROM tickets WHERE step=? AND attempt=? "
                "ORDER BY idx", (self.step, self.attempt))])
        return status


class _LedgerFile(OperatorLedger):
    """The token actions on a ledger file without a RunLedger (before the coordinator starts)."""

    def __init__(self, db):
        import time

        self.db, self.clock = db, time.time

    def _tx(self):
        db = self.db

        class Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return Tx()

    def _event(self, kind: str, detail: str) -> None:
        self.db.execute("INSERT INTO events(ts, kind, detail) VALUES(?, ?, ?)", (self.clock(), kind, detail))


def revoke_token_in(path: str | Path, ref: str) -> dict:
    """Revoke a join token in the ledger at `path` (works while the coordinator runs: WAL)."""
    import sqlite3

    if not Path(path).is_file():
        raise OperatorError(f"no ledger at {path}; pass the run's --config or --state", "not_found")
    db = sqlite3.connect(str(path), isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        return _LedgerFile(db).revoke_token(ref)
    finally:
        db.close()
