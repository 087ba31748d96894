"""The ledger read from another process: the same stores over a read-only connection.

coordinator/status_process.py builds the status object this way, on a core of its own, while
the coordinator's RunLedger writes the same file (SQLite WAL: readers see the last commit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gptjt_core.config import RunConfig
from gptjt_core.stage_spec import StageSpec

from ..cost_model import ModelShape
from .db import LedgerDB
from .run_ledger import RunLedger


class LedgerReader:
    """Read-only views of a ledger another process writes."""

    def __init__(self, path: str | Path, run: RunConfig, plan: list[StageSpec], shape: ModelShape | None,
                 clock: Callable[[], float] = time.time):
        """`plan`: the stages before any re-plan (the stored plan is read at each snapshot)."""
        self.ledger = object.__new__(RunLedger)  # composed, never initialised: nothing is written
        self.ledger._compose(LedgerDB(path, clock, read_only=True), run, plan, shape)

    def status(self) -> dict:
        """RunLedger.status() in one read transaction, with the plan re-read from the file."""
        ledger = self.ledger
        with ledger.db.snapshot():
            ledger.planner.reload()
            return ledger.status_view.status()

    def close(self) -> None:
        self.ledger.db.close()
