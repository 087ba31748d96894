"""What the ledger lets go of on a long, open run: workers long gone, and the oldest events (counts kept).

Join spam and churn would otherwise grow the workers table without bound, and every status
call reads it; events grow by three a step. Workers that left or died more than
coordinator.prune_after_s ago are deleted (their ids stay in tickets, reports and events, which
are the run's history); events beyond the newest coordinator.max_events are deleted after their
counts by kind are added to events_pruned, so event_counts() still counts every event ever.
"""

from __future__ import annotations

from gptjt_core.config import CoordinatorConfig

from .db import ALIVE_STATES, LedgerDB, alive_marks
from .measurements import Measurements


class Retention:
    def __init__(self, db: LedgerDB, coordinator: CoordinatorConfig, measurements: Measurements):
        self.db, self.config = db, coordinator  # prune_after_s, max_events: read at each use
        self.measurements = measurements  # a pruned worker's links go with it

    def prune(self) -> tuple[int, int]:
        """(workers, events) deleted; the caller holds the transaction."""
        cutoff = self.db.clock() - self.config.prune_after_s
        # A quarantined worker's row stays: it is what refuses the same volunteer's next join.
        gone = [r[0] for r in self.db.execute(f"SELECT id FROM workers WHERE state NOT IN ({alive_marks()}) AND "
                                              "state != 'quarantined' AND last_heartbeat < ?",
                                              (*ALIVE_STATES, cutoff)).fetchall()]
        for worker_id in gone:
            self.db.execute("DELETE FROM workers WHERE id=?", (worker_id,))
            self.measurements.forget(worker_id)
        if gone:
            self.db.set_meta("workers_pruned", int(self.db.meta("workers_pruned") or 0) + len(gone))
        newest = self.db.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0
        below = newest - self.config.max_events
        events = 0
        if below > 0:
            for kind, n in self.db.execute("SELECT kind, COUNT(*) FROM events WHERE id <= ? GROUP BY kind",
                                           (below,)).fetchall():
                self.db.execute("INSERT INTO events_pruned(kind, n) VALUES(?, ?) ON CONFLICT(kind) DO UPDATE SET "
                                "n = events_pruned.n + excluded.n", (kind, n))
                events += n
            self.db.execute("DELETE FROM events WHERE id <= ?", (below,))
        return len(gone), events
