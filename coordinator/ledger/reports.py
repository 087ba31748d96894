"""Step reports: what each member replica said in each phase of each attempt.

CONTRIBUTION (its own gradient's norm^2 and micro-batches), AVERAGED (the summed norm^2 and the
micro-batches the round held), APPLIED (a digest of its parameters after the update). One row
per (step, attempt, worker, kind); a restarted attempt's and a rolled-back step's rows go.
"""

from __future__ import annotations

from .db import LedgerDB
from .rules import Contribution, Sum
from .stored_values import stored_float, stored_norm_sq

CONTRIBUTION, AVERAGED, APPLIED = "contribution", "averaged", "applied"


class ReportBook:
    """The `reports` table: what each member said in each phase."""

    def __init__(self, db: LedgerDB):
        self.db = db

    def record(self, step: int, attempt: int, worker_id: str, kind: str, stage: int, grad_norm_sq: float,
               micro_batches: int, group_weight: float, digest: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO reports VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (step, attempt, worker_id, kind, stage, grad_norm_sq, micro_batches, group_weight, digest))

    def by_worker(self, step: int, attempt: int, kind: str) -> dict:
        rows = self.db.execute("SELECT * FROM reports WHERE step=? AND attempt=? AND kind=?",
                               (step, attempt, kind)).fetchall()
        return {r["worker"]: r for r in rows}

    def complete(self, step: int, attempt: int, kind: str, members: dict[int, list[str]]) -> dict | None:
        """This attempt's reports of `kind` by stage (rows in member order), once every member has
        sent one; None while some member has not."""
        by_worker = self.by_worker(step, attempt, kind)
        if any(w not in by_worker for ids in members.values() for w in ids):
            return None
        return {s: [by_worker[w] for w in ids] for s, ids in members.items()}

    def first_step(self, worker_id: str) -> int | None:
        """The first step this worker contributed gradients to (None: none yet)."""
        return self.db.execute("SELECT MIN(step) FROM reports WHERE worker=? AND kind='contribution'",
                               (worker_id,)).fetchone()[0]

    def forget_attempt(self, step: int, attempt: int) -> None:
        self.db.execute("DELETE FROM reports WHERE step=? AND attempt=?", (step, attempt))

    def forget_from(self, step: int) -> None:
        self.db.execute("DELETE FROM reports WHERE step>=?", (step,))

    def detail(self, step: int, attempt: int) -> dict:
        """Per stage, for the steps table: the replicas that contributed, the micro-batches their
        round summed, and each replica's parameter digest after the update."""
        detail: dict = {}
        for r in self.db.execute("SELECT * FROM reports WHERE step=? AND attempt=? ORDER BY worker",
                                 (step, attempt)).fetchall():
            d = detail.setdefault(str(r["stage"]), {"replicas": [], "summed_micro_batches": None, "digests": {}})
            if r["kind"] == CONTRIBUTION:
                d["replicas"].append(r["worker"])
            elif r["kind"] == AVERAGED:
                d["summed_micro_batches"] = r["group_weight"]
            elif r["kind"] == APPLIED:
                d["digests"][r["worker"]] = r["digest"]
        return detail


def contributions(by_stage: dict) -> dict[int, list[Contribution]]:
    return {s: [Contribution(r["worker"], stored_norm_sq(r["grad_norm_sq"], "reports.grad_norm_sq"),
                             r["micro_batches"] or 0) for r in rows]
            for s, rows in by_stage.items()}


def sums(by_stage: dict) -> dict[int, list[Sum]]:
    return {s: [Sum(stored_float(r["group_weight"], "reports.group_weight"),
                    stored_norm_sq(r["grad_norm_sq"], "reports.grad_norm_sq")) for r in rows]
            for s, rows in by_stage.items()}
