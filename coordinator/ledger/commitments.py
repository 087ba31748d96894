"""What each stage committed to per micro-batch, and the checks made of those commitments (with their verdicts).

A member's CONTRIBUTION report carries one commitment per micro-batch it processed in the
attempt (gptjt_core/commitment.py, gptjt_core/chain.py). They are kept per (step, attempt,
ticket, stage, worker) for KEEP_STEPS steps: a spot check or a rollback looks at recent steps
only, and a 6B run's 64 micro-batches x 8 stages x ~700 bytes would grow the ledger by 360 KB a
step. A check that agreed is kept as long as the commitments it read (a 6B run's 64 micro-batches
x 7 links would otherwise add ~450 rows a step for the whole run); a mismatch, the evidence, is
kept for the whole run. The counts the status shows are meta counters, so they cost the same on a
long run and survive the pruning.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from gptjt_core.chain import Links, Record, check_chain
from gptjt_core.commitment import Commitment

from .db import LedgerDB
from .events import EventLog

KEEP_STEPS = 64  # steps of commitments kept behind the one closing
CHAIN_OK, CHAIN_MISMATCH = "chain_ok", "chain_mismatch"  # verdicts of a chain check (neighbours' digests)
SPOT_AGREE = "agree"  # a spot check that agreed (ledger/spot_checks.py): pruned like a chain check that did


class Submitted(NamedTuple):
    """One micro-batch's commitment as a report carries it (passed the door: it parses)."""

    ticket: int
    attempt: int
    blob: bytes  # Commitment.to_bytes()
    sent: bytes | None
    returned: bytes | None
    sent_back: bytes | None


class CommitmentBook:
    """The `commitments` and `checks` tables and the verification counters."""

    def __init__(self, db: LedgerDB, events: EventLog):
        self.db, self.events = db, events

    def record(self, step: int, attempt: int, stage: int, worker_id: str, submitted: list[Submitted]) -> list[int]:
        """Keep a member's commitments to tickets of (step, attempt); returns the tickets kept.
        Others (another attempt's, a ticket of another step) are dropped: an honest worker sends none."""
        ours = {r[0] for r in self.db.execute("SELECT id FROM tickets WHERE step=? AND attempt=?", (step, attempt))}
        kept = [c for c in submitted if c.attempt == attempt and c.ticket in ours]
        for c in kept:
            self.db.execute("INSERT OR REPLACE INTO commitments VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (step, attempt, c.ticket, stage, worker_id, c.blob, c.sent, c.returned, c.sent_back))
        self._count("verification_commitments", len(kept))
        return [c.ticket for c in kept]

    def records(self, step: int, attempt: int) -> list[Record]:
        rows = self.db.execute("SELECT * FROM commitments WHERE step=? AND attempt=? ORDER BY ticket, stage, worker",
                               (step, attempt)).fetchall()
        return [Record(r["ticket"], r["stage"], r["worker"], Commitment.from_bytes(r["blob"]).input,
                       Links(r["sent"], r["returned"], r["sent_back"])) for r in rows]

    def check_chain(self, step: int, attempt: int) -> int:
        """At the close of (step, attempt): does each stage's committed input equal what the stage
        before committed to sending, and the gradient it got back what the stage after committed
        to sending back? Every link checked is a row; a mismatch is an event naming both sides.
        Nobody is quarantined on this alone (which side lies takes a third opinion). Returns the
        number of mismatches."""
        checks = check_chain(self.records(step, attempt))
        for c in checks:
            verdict = CHAIN_OK if c.agrees else CHAIN_MISMATCH
            self.db.execute("INSERT INTO checks(step, attempt, ticket, stage, kind, verdict, worker, peers, detail) "
                            "VALUES(?, ?, ?, ?, 'chain', ?, ?, ?, ?)",
                            (step, attempt, c.ticket, c.stage, verdict, c.upstream, json.dumps(c.downstream), c.detail))
            if not c.agrees:
                self.events.record("commitment_mismatch", f"step {step} attempt {attempt} ticket {c.ticket}: stage "
                                   f"{c.stage} ({c.upstream}) and stage {c.stage + 1} ({', '.join(c.downstream)}) "
                                   f"disagree about the bytes between them: {c.detail}")
        mismatches = sum(not c.agrees for c in checks)
        self._count("verification_checks", len(checks))
        self._count("verification_mismatches", mismatches)
        self.db.execute("DELETE FROM commitments WHERE step < ?", (step - KEEP_STEPS,))
        self.db.execute("DELETE FROM checks WHERE step < ? AND verdict IN (?, ?)", (step - KEEP_STEPS, CHAIN_OK,
                                                                                   SPOT_AGREE))
        return mismatches

    def checks(self, step: int) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM checks WHERE step=? ORDER BY id", (step,))]

    def counts(self) -> dict[str, int]:
        """For the status object: commitments kept, checks made and mismatches found, over the run."""
        return {name: int(self.db.meta(f"verification_{name}") or 0)
                for name in ("commitments", "checks", "mismatches")}

    def _count(self, key: str, n: int) -> None:
        if n:
            self.db.set_meta(key, int(self.db.meta(key) or 0) + n)
