"""The run's event log: what happened, by kind and category, persisted with the ledger.

Every change an operator may want to know about is one row (ts, kind, detail); events survive
restarts, and the dashboard, `gptjt events` and the status object read them by kind through
an index, so a long run's routine events are never scanned.
"""

from __future__ import annotations

from .db import LedgerDB
from .errors import OperatorError

# Event kinds by what an operator looks for. Kinds not listed fall in "other".
EVENT_CATEGORIES = {
    "joins": ("worker_joined",),
    "leaves": ("worker_left", "session_ended"),
    "deaths": ("worker_dead", "worker_unreachable"),
    "replans": ("stage_assigned", "replica_moved", "stage_vacant", "replica_admitted", "replica_lost",
                "plan_changed", "replanned"),
    "recovery": ("rolled_back", "step_restarted", "resumed_from_store", "coordinator_restarted"),
    # coordinator/liveness.py; work_failed: a worker's own work failed (ledger release with a reason)
    "liveness": ("step_stuck", "averaging_failed", "worker_stuck", "replicas_reduced", "work_failed"),
    "checkpoints": ("checkpoint_complete", "checkpoint_saved", "checkpoints_pruned", "store_not_empty"),
    "rejected": ("poisoned_update", "step_skipped", "replicas_diverged", "update_rejected"),
    "steps": ("step_open", "step_accumulated", "step_closed"),
    "operator": ("paused", "resumed", "drain_requested", "token_created", "token_revoked", "run_created"),
    "workers": ("worker_state", "tickets_released"),
    "measurements": ("measured",),  # probed devices and links (the scheduler's inputs)
    # checks of stage work (ledger/commitments.py, ledger/spot_checks.py) and what they decide
    "verification": ("commitment_mismatch", "spot_check_failed", "spot_check_disputed", "worker_quarantined",
                     "quarantine_lifted"),
}
_CATEGORY_OF = {kind: cat for cat, kinds in EVENT_CATEGORIES.items() for kind in kinds}
# Routine events that would push the notable ones out of a short list.
ROUTINE_CATEGORIES = ("steps", "workers")


def released_event(worker_id: str, n: int, reason: str) -> tuple[str, str]:
    """(kind, detail) of `n` leases handed back: routine (tickets_released: a drain, a failed
    downstream call) unless the worker gave a `reason` (checked at the door), why its own work
    failed, which is notable (work_failed): the run waits on what it could not do."""
    if reason:
        return "work_failed", f"{worker_id} handed back {n} ticket(s) after its work failed: {reason}"
    return "tickets_released", f"{worker_id} handed back {n} ticket(s)"


def event_category(kind: str) -> str:
    if kind in _CATEGORY_OF:
        return _CATEGORY_OF[kind]
    if "plan" in kind:  # re-plans named otherwise by the scheduler
        return "replans"
    if kind.startswith("checkpoint"):
        return "checkpoints"
    return "other"


class EventLog:
    """Appends events (inside the caller's transaction) and reads them back."""

    def __init__(self, db: LedgerDB):
        self.db = db

    def record(self, kind: str, detail: str) -> None:
        self.db.execute("INSERT INTO events(ts, kind, detail) VALUES(?, ?, ?)", (self.db.clock(), kind, detail))

    def query(self, after_id: int = 0, limit: int = 50, kind: str = "") -> list[dict]:
        """Events oldest first: the newest `limit` after `after_id`, of a kind or a category."""
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
        return [_with_category(r) for r in reversed(rows)]

    def recent(self, limit: int = 50) -> list[dict]:
        """The newest `limit` events of any kind, oldest first."""
        rows = self.db.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_with_category(r) for r in reversed(rows)]

    def notable(self, limit: int = 50) -> list[dict]:
        """The newest `limit` events that are not routine step or worker-state events."""
        routine = {k for c in ROUTINE_CATEGORIES for k in EVENT_CATEGORIES[c]}
        # By kind through the events_by_kind index: a long run's routine events (3 a step)
        # are never scanned.
        kinds = [k for (k,) in self.db.execute("SELECT DISTINCT kind FROM events").fetchall() if k not in routine]
        rows = self.db.execute("SELECT * FROM events WHERE kind IN (%s) ORDER BY id DESC LIMIT ?"
                               % ",".join("?" * len(kinds)), (*kinds, limit)).fetchall()
        return [_with_category(r) for r in reversed(rows)]

    def counts(self) -> dict[str, int]:
        """Every event ever, by kind (those let go by retention.py included)."""
        counts = dict(self.db.execute("SELECT kind, n FROM events_pruned").fetchall())
        for kind, n in self.db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall():
            counts[kind] = counts.get(kind, 0) + n
        return counts

    def details(self, kind: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT detail FROM events WHERE kind=? ORDER BY id", (kind,))]


def _with_category(row) -> dict:
    return {**dict(row), "category": event_category(row["kind"])}
