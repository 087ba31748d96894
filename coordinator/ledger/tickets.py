"""Micro-batch tickets and the exactly-once audit.

A ticket is one micro-batch of one attempt of a step: (step, attempt, idx) -> (shard, offset).
States: pending -> leased (to one stage-0 replica) -> committed; a lease goes back to pending
when its worker dies or releases it; a restarted attempt's tickets are `aborted`, a rolled-back
step's `rolled_back`. Invariant: a closed step has each of its micro-batches committed exactly
once (its verdict is taken as it closes and kept in step_audits).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from gptjt_core.config import RunConfig
from gptjt_core.data import step_micro_batches

from .db import LedgerDB
from .events import EventLog
from .rules import exactly_once
from .stored_values import stored_float

log = logging.getLogger("gptjt.coordinator.ledger")


@dataclass(frozen=True)
class TicketRow:
    """A leased ticket as the worker is told it."""
    id: int
    step: int
    attempt: int
    idx: int
    shard: int
    offset: int


class TicketBook:
    """The `tickets` and `step_audits` tables."""

    def __init__(self, db: LedgerDB, events: EventLog, run: RunConfig):
        self.db, self.events, self.run = db, events, run
        # Ticket counts of the steps before `below`, whose tickets no longer change (a rollback,
        # the only thing that touches them, drops this): (below, counts) or None.
        self._settled: tuple[int, dict] | None = None

    # -- issuing -----------------------------------------------------------------------
    def create(self, step: int, attempt: int, reissue: bool = False) -> None:
        for ref in step_micro_batches(step, self.run.train, self.run.data.num_shards):
            self.db.execute("INSERT INTO tickets(step, attempt, idx, shard, offset, state, issues) "
                            "VALUES(?, ?, ?, ?, ?, 'pending', ?)",
                            (step, attempt, ref.index, ref.shard, ref.offset, 1 if reissue else 0))

    def exist(self, step: int, attempt: int) -> bool:
        return self.db.execute("SELECT COUNT(*) FROM tickets WHERE step=? AND attempt=?",
                               (step, attempt)).fetchone()[0] > 0

    def lease(self, worker_id: str, step: int, attempt: int, max_tickets: int,
              own_shards: tuple[int, int] = (0, 1)) -> list[TicketRow]:
        """Up to max_tickets pending tickets of (step, attempt), this worker's own shards first.
        own_shards (rank, replicas): a stage-0 replica's shards are those with shard % replicas ==
        rank, so in a steady swarm each replica opens and reads only its share of the data (a
        shard's reader packs from the shard's start); it takes others' tickets only when its own
        are gone, so no ticket waits for its owner."""
        rank, replicas = own_shards
        rows = self.db.execute("SELECT * FROM tickets WHERE step=? AND attempt=? AND state='pending' "
                               "ORDER BY shard % ? != ?, idx LIMIT ?",
                               (step, attempt, max(1, replicas), rank, max(0, max_tickets))).fetchall()
        for r in rows:
            self.db.execute("UPDATE tickets SET state='leased', worker=?, leased_at=?, leases=leases+1 WHERE id=?",
                            (worker_id, self.db.clock(), r["id"]))
        return [TicketRow(r["id"], r["step"], r["attempt"], r["idx"], r["shard"], r["offset"]) for r in rows]

    def commit(self, worker_id: str, ticket_id: int, attempt: int, loss: float, tokens: int) -> tuple[str, bool]:
        """Count a finished micro-batch once: (committed / already_committed / stale / not_leased,
        whether every ticket of its attempt is now committed)."""
        row = self.db.execute("SELECT * FROM tickets WHERE id=?", (ticket_id,)).fetchone()
        if row is None:
            return "not_leased", False
        if row["state"] == "committed":
            return "already_committed", False
        if row["state"] == "aborted" or row["attempt"] != attempt:
            return "stale", False
        if row["state"] != "leased" or row["worker"] != worker_id:
            return "not_leased", False
        self.db.execute("UPDATE tickets SET state='committed', committed_at=?, loss=?, tokens=? WHERE id=?",
                        (self.db.clock(), loss, tokens, ticket_id))
        left = self.db.execute("SELECT COUNT(*) FROM tickets WHERE step=? AND attempt=? AND state!='committed'",
                               (row["step"], row["attempt"])).fetchone()[0]
        return "committed", left == 0

    def release(self, worker_id: str, ticket_ids: list[int]) -> int:
        n = 0
        for tid in ticket_ids:
            n += self.db.execute("UPDATE tickets SET state='pending', worker=NULL, issues=issues+1 "
                                 "WHERE id=? AND worker=? AND state='leased'", (tid, worker_id)).rowcount
        return n

    def release_all(self, worker_id: str) -> int:
        """Every lease of a dead or departed worker goes back to pending; returns how many."""
        return self.db.execute("UPDATE tickets SET state='pending', worker=NULL, issues=issues+1 "
                               "WHERE worker=? AND state='leased'", (worker_id,)).rowcount

    # -- restarting and rolling back ---------------------------------------------------
    def abort(self, step: int, attempt: int) -> None:
        self.db.execute("UPDATE tickets SET state='aborted' WHERE step=? AND attempt=?", (step, attempt))

    def roll_back(self, first_step: int) -> None:
        """Tickets of every step from `first_step` on no longer count (those steps re-run)."""
        self._settled = None
        self.db.execute("UPDATE tickets SET state='rolled_back' WHERE step>=? AND state!='aborted'", (first_step,))
        self.db.execute("DELETE FROM step_audits WHERE step>=?", (first_step,))

    def next_attempt(self, step: int) -> int:
        return self.db.execute("SELECT COALESCE(MAX(attempt), -1) FROM tickets WHERE step=?",
                               (step,)).fetchone()[0] + 1

    # -- facts of the open step --------------------------------------------------------
    def has_work(self, step: int, attempt: int) -> bool:
        return self.db.execute("SELECT COUNT(*) FROM tickets WHERE step=? AND attempt=? AND state!='pending'",
                               (step, attempt)).fetchone()[0] > 0

    def leases(self, step: int, attempt: int) -> dict[str, int]:
        """worker -> tickets of (step, attempt) it holds leased."""
        return dict(self.db.execute("SELECT worker, COUNT(*) FROM tickets WHERE step=? AND attempt=? AND "
                                    "state='leased' GROUP BY worker", (step, attempt)).fetchall())

    def last_commit(self, step: int, attempt: int) -> float | None:
        return self.db.execute("SELECT MAX(committed_at) FROM tickets WHERE step=? AND attempt=?",
                               (step, attempt)).fetchone()[0]

    def totals(self, step: int, attempt: int) -> tuple[float, int]:
        """(loss, tokens) summed over the committed tickets of (step, attempt).

        A share committed as NaN (a diverged micro-batch; SQLite keeps NaN as NULL) makes the
        step's loss not finite: it is +Inf, which the steps table can hold (NaN it cannot), and
        the step closes; the status object shows it as null."""
        loss, tokens, count, unknown = self.db.execute(
            "SELECT SUM(loss), SUM(tokens), COUNT(*), COUNT(*) - COUNT(loss) FROM tickets WHERE step=? AND "
            "attempt=? AND state='committed'", (step, attempt)).fetchone()
        if count == 0:
            return 0.0, 0
        loss = stored_float(loss, "tickets.loss")
        if unknown or math.isnan(loss):
            log.warning("step %d attempt %d: %d of %d micro-batch losses are not finite; the step's loss is "
                        "recorded as +Inf", step, attempt, unknown, count)
            loss = math.inf
        return loss, tokens or 0

    def of_attempt(self, step: int, attempt: int) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT idx, shard, offset, state, worker, leases FROM tickets "
                                                 "WHERE step=? AND attempt=? ORDER BY idx", (step, attempt))]

    # -- counting ----------------------------------------------------------------------
    def counts(self, open_step: int) -> dict:
        """issued: leases handed out; reissued: tickets put back after a death, a release or a
        step restart; committed: micro-batches counted (each exactly once).

        Closed steps' tickets never change until a rollback, so their counts are kept and
        extended step by step; only the open step's tickets are counted on each call (a full
        scan of a GPT-JT-length run, ~1.7 M tickets, took 0.6 s of the event loop)."""
        settled = self._settled
        if settled is None or settled[0] > open_step:
            settled = (0, count_tickets(self.db, 0, 0))
        if settled[0] < open_step:
            settled = (open_step, _add_counts(settled[1], count_tickets(self.db, settled[0], open_step)))
        self._settled = settled
        return _add_counts(settled[1], count_tickets(self.db, open_step, None))

    def audit(self, step: int) -> None:
        """Take a closing step's exactly-once verdict and keep it. A closed step's tickets never
        change again (a commit needs a leased ticket of the open step; a rollback deletes the
        step with its verdict), so status sums kept verdicts instead of re-checking every ticket
        of the run each time (most of 6 s a call on a GPT-JT-length ledger: bench status)."""
        self.db.execute("INSERT OR REPLACE INTO step_audits VALUES(?, ?, ?, ?)", (step, *self._verdict(step)))

    def _verdict(self, step: int) -> tuple[int, int, str | None]:
        counted = dict(self.db.execute("SELECT idx, COUNT(*) FROM tickets WHERE step=? AND state='committed' "
                                       "GROUP BY idx", (step,)).fetchall())
        return exactly_once(counted, self.run.train.micro_batches_per_step, step)

    def exactly_once_counts(self) -> dict:
        """Micro-batches of closed steps never counted (lost) or counted more than once (double)."""
        lost, double = self.db.execute("SELECT COALESCE(SUM(lost), 0), COALESCE(SUM(double), 0) "
                                       "FROM step_audits").fetchone()
        return {"lost": lost, "double": double}

    def violations(self) -> list[str]:
        """Every closed step must count each of its micro-batches exactly once (verdicts kept as the
        steps closed)."""
        return [r[0] for r in self.db.execute("SELECT violation FROM step_audits WHERE violation IS NOT NULL "
                                              "ORDER BY step").fetchall()]

    def audit_all(self, closed_steps: list[int]) -> list[str]:
        """The same check re-run now over every closed step's tickets; it must agree with the kept
        verdicts (tests and benchmarks: it reads every ticket of the run)."""
        return [v for v in (self._verdict(step)[2] for step in closed_steps) if v is not None]

    def audit_unaudited(self) -> None:
        """Verdicts for closed steps of a ledger from before verdicts were kept."""
        for (step,) in self.db.execute("SELECT step FROM steps WHERE step NOT IN (SELECT step FROM step_audits)"
                                       ).fetchall():
            self.audit(step)


def count_tickets(db: LedgerDB, first_step: int, end_step: int | None) -> dict:
    """Ticket counts over steps first_step <= step < end_step (None: no end)."""
    where, args = ("step>=? AND step<?", (first_step, end_step)) if end_step is not None else ("step>=?", (first_step,))
    rows = dict(db.execute(f"SELECT state, COUNT(*) FROM tickets WHERE {where} GROUP BY state", args).fetchall())
    issued, reissued = db.execute(f"SELECT COALESCE(SUM(leases), 0), COALESCE(SUM(issues), 0) FROM tickets "
                                  f"WHERE {where}", args).fetchone()
    return {"issued": issued, "committed": rows.get("committed", 0), "reissued": reissued,
            "leased": rows.get("leased", 0), "pending": rows.get("pending", 0),
            "aborted": rows.get("aborted", 0), "rolled_back": rows.get("rolled_back", 0)}


def _add_counts(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}
