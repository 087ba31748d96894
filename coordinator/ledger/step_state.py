"""Where the run stands: step, attempt, phase, members, restore epoch: typed access to the meta table.

The step protocol (steps.py), the plan (planning.py) and recovery (recovery.py) all read and
move these facts; they live here, in one place, so that none of those modules needs another to
know where the run is.

Phases, in order: WAITING (a stage lacks a ready member) -> OPEN (tickets leased and committed)
-> ACCUMULATED (members report their gradient norms) -> AVERAGING (replicas sum their gradients;
replicas_per_stage > 1) -> APPLYING (every member steps its optimizer) -> the next step's
WAITING, or DONE.
"""

from __future__ import annotations

from .db import LedgerDB
from .stored_values import stored_float

WAITING, OPEN, ACCUMULATED, AVERAGING, APPLYING, DONE = ("waiting", "open", "accumulated", "averaging",
                                                         "applying", "done")


class StepState:
    """The run's position and the open step's members, in the meta table."""

    def __init__(self, db: LedgerDB):
        self.db = db

    def initialise(self) -> None:
        """A new ledger: step 0 attempt 0, waiting, nothing restored yet."""
        for key, value in (("step", 0), ("attempt", 0), ("phase", WAITING), ("plan_version", 1), ("paused", 0),
                           ("restore_epoch", 0), ("restore_step", 0), ("restore_from_store", 0),
                           ("members", "{}"), ("contributors", "{}"), ("norm_ref", "{}")):
            self.db.set_meta(key, value)

    # -- position ----------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.db.meta("step"))

    @step.setter
    def step(self, value: int) -> None:
        self.db.set_meta("step", value)

    @property
    def attempt(self) -> int:
        return int(self.db.meta("attempt"))

    @attempt.setter
    def attempt(self, value: int) -> None:
        self.db.set_meta("attempt", value)

    @property
    def phase(self) -> str:
        return self.db.meta("phase")

    def set_phase(self, phase: str) -> None:
        """Move the step protocol to `phase`; the time it began is kept for its deadline."""
        if self.db.meta("phase") != phase:
            self.db.set_meta("phase_since", self.db.clock())
        self.db.set_meta("phase", phase)

    @property
    def phase_since(self) -> float | None:
        value = self.db.meta("phase_since")
        return float(value) if value else None

    def restart_phase_clock(self) -> None:
        self.db.set_meta("phase_since", self.db.clock())

    WATCHED = ("step", "attempt", "phase", "plan_version", "paused", "restore_epoch", "restore_step",
               "restore_from_store", "members",
               "contributors", "drain_requested", "standby_why", "grad_norm")

    def watched(self) -> tuple:
        """What of the step's state a Watch stream shows (RunState), in one read: a transaction
        that leaves it as it was wakes no stream (a lease, a commit mid-step)."""
        rows = self.db.execute(f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(self.WATCHED))}) "
                               "ORDER BY key", self.WATCHED).fetchall()
        return tuple((r["key"], r["value"]) for r in rows)

    @property
    def paused(self) -> bool:
        return self.db.meta("paused") == "1"

    @paused.setter
    def paused(self, value: bool) -> None:
        self.db.set_meta("paused", int(value))

    # -- the plan's version and what stages must hold -----------------------------------
    @property
    def plan_version(self) -> int:
        return int(self.db.meta("plan_version"))

    def bump_plan_version(self) -> None:
        """Workers' assignments (peers' addresses, members) changed: Watch streams send them."""
        self.db.set_meta("plan_version", self.plan_version + 1)

    @property
    def restore_epoch(self) -> int:
        return int(self.db.meta("restore_epoch"))

    @property
    def restore_step(self) -> int:
        return int(self.db.meta("restore_step"))

    @property
    def restore_from_store(self) -> bool:
        return self.db.meta("restore_from_store") == "1"

    def restore(self, step: int, from_store: bool) -> None:
        """Every stage must (re)load its state at `step` (from the store, or the initial weights):
        a new restore epoch; a step opens only once every stage has loaded it."""
        self.db.set_meta("restore_epoch", self.restore_epoch + 1)
        self.db.set_meta("restore_step", step)
        self.db.set_meta("restore_from_store", int(from_store))

    def bump_restore_epoch(self) -> None:
        """A worker moved to another stage: its heartbeats report the old epoch until it reloads."""
        self.db.set_meta("restore_epoch", self.restore_epoch + 1)

    def is_holder(self, row) -> bool:
        """Does this worker hold the run's current state of its stage (a peer to copy from)?"""
        return (row["state"] in ("ready", "draining") and row["loaded_epoch"] == self.restore_epoch
                and row["position"] in (self.step, self.step + 1)
                and (row["position"] == self.step or self.phase == APPLYING))

    # -- the open step's members and verdicts ------------------------------------------
    def members(self) -> dict[int, list[str]]:
        """The replicas of each stage taking part in the current step (fixed when it opens)."""
        return {int(k): v for k, v in self.db.json_meta("members", {}).items()}

    def set_members(self, members: dict[int, list[str]]) -> None:
        self.db.set_json_meta("members", {str(k): v for k, v in members.items()})

    def contributors(self) -> dict[str, list[str]]:
        """stage (as a string) -> replicas whose gradient the step counts (after judging)."""
        return self.db.json_meta("contributors", {})

    def set_contributors(self, contributors: dict[int, list[str]]) -> None:
        self.db.set_json_meta("contributors", {str(k): v for k, v in contributors.items()})

    def norm_refs(self) -> dict[int, float]:
        return {int(k): v for k, v in self.db.json_meta("norm_ref", {}).items()}

    def set_norm_refs(self, refs: dict[int, float]) -> None:
        self.db.set_json_meta("norm_ref", {str(k): v for k, v in refs.items()})

    @property
    def grad_norm(self) -> float:
        """The step's global norm (0.0 before one is known; NaN for what an older version stored
        that is no number, e.g. a complex norm: workers then skip the update)."""
        value = self.db.meta("grad_norm")
        return stored_float(value, "meta grad_norm") if value is not None else 0.0

    @grad_norm.setter
    def grad_norm(self, value: float) -> None:
        self.db.set_meta("grad_norm", value)

    @property
    def step_opened(self) -> float | None:
        value = self.db.meta("step_opened")
        return float(value) if value is not None else None

    def mark_opened(self) -> None:
        self.db.set_meta("step_opened", self.db.clock())

    @property
    def step_closed_at(self) -> float:
        return float(self.db.meta("step_closed_at") or 0.0)

    def mark_closed(self) -> None:
        self.db.set_meta("step_closed_at", self.db.clock())

    # -- replicas held out after an averaging fallback ---------------------------------
    def held_out(self) -> dict[str, int]:
        """Workers kept out of stages by an averaging fallback: id -> the step their hold ends."""
        return self.db.json_meta("held_out", {})

    def set_held_out(self, holds: dict[str, int]) -> None:
        self.db.set_json_meta("held_out", holds)

    def drains(self) -> dict[str, float]:
        """Workers the operator asked to drain: id -> when."""
        return self.db.json_meta("drain_requested", {})

    def set_drains(self, drains: dict[str, float]) -> None:
        self.db.set_json_meta("drain_requested", drains)
