"""The checkpoint index: which stage files the store holds for which step, and which steps are complete.

A step is complete when its files cover every layer plus the embedding and the LM head (any
split: the store re-slices by layer). Invariant: the ledger forgets a step's files before the
caller deletes them, so a crash in between leaves orphaned files, never a ledger naming
missing ones; the step the run last restored from is kept while a stage worker may still read it.
"""

from __future__ import annotations

import sqlite3

from gptjt_core.config import CoordinatorConfig
from gptjt_core.stage_spec import StageSpec

from .db import LedgerDB
from .events import EventLog


class CheckpointIndex:
    """The `checkpoints` table: stage files by step, and which steps are complete."""

    def __init__(self, db: LedgerDB, events: EventLog, n_layer: int, coordinator: CoordinatorConfig):
        self.db, self.events = db, events
        self.n_layer = n_layer
        self.config = coordinator  # keep_checkpoints: complete steps to keep (0: all), read at each use

    def record(self, step: int, spec: StageSpec, path: str, nbytes: int | None = None,
               sha256: str | None = None) -> bool:
        """nbytes, sha256: what a worker that wrote the file into a shared store declared (the
        store checks the digest when the file is read); None for files streamed through us.
        Returns whether the step was complete before this file (a stage's last replica leaving
        saves the open step's state, which the last checkpoint may already hold)."""
        was_complete = self.is_complete(step)
        self.db.execute("INSERT OR REPLACE INTO checkpoints(step, start_layer, end_layer, embed, head, path, ts, "
                        "nbytes, sha256) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (step, spec.start, spec.end, int(spec.embed), int(spec.head), path, self.db.clock(),
                         nbytes, sha256))
        return was_complete

    def digests(self, step: int) -> dict[str, str]:
        """path -> declared SHA-256 of the step's files that workers wrote themselves."""
        return {r["path"]: r["sha256"] for r in self.stored(step) if r["sha256"]}

    def stored(self, step: int) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM checkpoints WHERE step=?", (step,)).fetchall()

    def covers(self, step: int, spec: StageSpec) -> bool:
        rows = self.stored(step)
        layers = {i for r in rows for i in range(r["start_layer"], r["end_layer"])}
        return (set(range(spec.start, spec.end)) <= layers and (not spec.embed or any(r["embed"] for r in rows))
                and (not spec.head or any(r["head"] for r in rows)))

    def is_complete(self, step: int) -> bool:
        return self.covers(step, StageSpec(0, self.n_layer, embed=True, head=True))

    def steps(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT step FROM checkpoints ORDER BY step").fetchall()]

    def latest_complete(self) -> int | None:
        for step in reversed(self.steps()):
            if self.is_complete(step):
                return step
        return None

    def forget_after(self, step: int) -> list[int]:
        """Forget the checkpoints of steps after `step` (a rollback to it undid them: they hold
        the undone work, a quarantined worker's perhaps, and must never be a restore target or the
        weights of a spot check). Their files stay until the re-run writes the same steps again."""
        later = [s for s in self.steps() if s > step]
        self.db.execute("DELETE FROM checkpoints WHERE step > ?", (step,))
        return later

    def forget_old(self, restoring: int | None) -> list[int]:
        """Under coordinator.keep_checkpoints, forget every step older than the oldest kept complete
        one, except `restoring` (a restore target a stage worker may still be reading). Returns the
        steps forgotten: the caller deletes their files."""
        steps = self.steps()[::-1]
        complete = [s for s in steps if self.is_complete(s)]
        keep = self.config.keep_checkpoints
        if keep <= 0 or len(complete) <= keep:
            return []
        oldest_kept = complete[keep - 1]
        # Older steps, complete or partial, are no restore target any more: a rollback goes to
        # the newest complete step.
        old = [s for s in steps if s < oldest_kept and s != restoring]
        if old:
            self.db.execute(f"DELETE FROM checkpoints WHERE step IN ({','.join('?' * len(old))})", old)
            self.events.record("checkpoints_pruned", f"deleting the store's step(s) {sorted(old)}: keep_checkpoints = "
                               f"{keep} keeps {sorted(complete[:keep])}")
        return sorted(old)
