"""Closed steps: loss, tokens, global norm, timing and per-stage detail, one row each.

A rollback deletes the rows of the steps it undoes (they are run again); so the rows are always
the history of the weights the run holds. Reads stay cheap however long the run: the newest
HISTORY_STEPS in full, the whole run as at most LOSS_CURVE_POINTS bucketed points.
"""

from __future__ import annotations

import json
import statistics

from gptjt_core.recorded_digests import recorded_digests

from .db import LedgerDB
from .stored_values import shown_float, stored_json

HISTORY_STEPS = 200  # closed steps listed in full in the status object, newest
LOSS_CURVE_POINTS = 500  # points of the status object's whole-run loss curve, at most


class StepHistory:
    """The `steps` table: closed steps, read back bounded however long the run."""

    def __init__(self, db: LedgerDB):
        self.db = db

    def close(self, step: int, attempts: int, loss: float, tokens: int, grad_norm: float, opened: float,
              detail: dict) -> None:
        self.db.execute("INSERT INTO steps VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                        (step, attempts, loss, tokens, grad_norm, opened, self.db.clock(), json.dumps(detail)))

    def undo_from(self, step: int) -> list[int]:
        """Forget the closed steps from `step` on (a rollback); returns them."""
        undone = [r[0] for r in self.db.execute("SELECT step FROM steps WHERE step>=? ORDER BY step", (step,))]
        self.db.execute("DELETE FROM steps WHERE step>=?", (step,))
        self.db.execute("DELETE FROM verified_work WHERE step>=?", (step,))  # its tokens are trained again
        return undone

    def closed_steps(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT step FROM steps ORDER BY step").fetchall()]

    def recent(self, limit: int | None = None) -> list:
        """The newest `limit` (default HISTORY_STEPS) closed steps, oldest first."""
        limit = HISTORY_STEPS if limit is None else limit
        return self.db.execute("SELECT * FROM steps ORDER BY step DESC LIMIT ?", (limit,)).fetchall()[::-1]

    def attested(self) -> tuple[int, dict[int, tuple[tuple[int, int], tuple[str, ...]]]]:
        """The digests each stage's members reported after the newest closed step, with the layer
        range they are of: (that step + 1, {stage: ((start, end), distinct digests)}); (0, {})
        before any step closed. A stage whose range was not recorded is left out."""
        row = self.db.execute("SELECT step, detail FROM steps ORDER BY step DESC LIMIT 1").fetchone()
        if row is None:
            return 0, {}
        out = {}
        for stage, d in stored_json(row[1], {}, "steps.detail").items():
            recorded = recorded_digests(d)
            if recorded is not None and recorded[1] and stage.isdigit():
                out[int(stage)] = recorded
        return row[0] + 1, out

    def total_tokens(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(tokens), 0) FROM steps").fetchone()[0]

    def median_seconds(self, last: int = 5) -> float | None:
        rows = self.db.execute("SELECT closed - opened FROM steps ORDER BY step DESC LIMIT ?", (last,)).fetchall()
        return statistics.median(r[0] for r in rows) if rows else None

    def loss_curve(self, steps_done: int) -> list[dict]:
        """The whole run's loss and throughput in at most LOSS_CURVE_POINTS points: consecutive
        closed steps averaged in equal buckets (one step a point while the run is short), each
        point at its bucket's last step. tokens_per_s: the bucket's tokens over its steps' time."""
        bucket = max(1, -(-steps_done // LOSS_CURVE_POINTS))
        rows = self.db.execute("SELECT MAX(step), AVG(loss), SUM(tokens), SUM(closed - opened) FROM steps "
                               "GROUP BY step / ? ORDER BY 1", (bucket,)).fetchall()
        return [{"step": step, "loss": shown_float(loss, "steps.loss"),
                 "tokens_per_s": tokens / seconds if seconds > 0 else None}
                for step, loss, tokens, seconds in rows]
