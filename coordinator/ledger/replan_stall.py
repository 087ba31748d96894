"""How long a plan applied at a checkpoint held the run up: the fixed part of a re-plan's cost.

A pending plan applies at a complete checkpoint (recovery.maybe_apply_pending): every stage
reloads its range from the store, then the next step opens. The seconds between are what the
re-plan cost. Less the layer loads the scheduler priced for its busiest loader
(scheduler.layer_load_s each), they are the reload itself: restarting a stage (the model slice,
the store's state, a new averager), which no layer count shows. A calm 2 x 2 chaos soak of the
tiny model (by hand at e544265, from its events) was held 15.2 s against the 4 s its two layers
were priced at; a one-replica swarm of simulated devices (test_scheduler_swarm) under 1 s. The
searches after it price every plan that makes a holder reload at that much more
(plan_horizon.Horizon.reload_s), so a plan a few per cent faster no longer moves a short run.

The figure is the last such re-plan's, kept in the ledger across restarts. Plans applied at a
failure's restore are not timed (the failure costs its reload anyway), nor those applied before
the first step (everyone loads then). A failure's restore while a re-plan reloads (a worker
that dies or is quarantined then) ends that timing unrecorded: the open it waits for would then
time the failure's recovery as well, and price every later re-plan at it. An operator's pause
does not hold a step's open, so it is not in the figure.
"""

from __future__ import annotations

from gptjt_core.config import SchedulerConfig

from .db import LedgerDB
from .events import EventLog

_STARTED, _RELOAD = "replan_stall_from", "replan_reload_s"


class ReplanStall:
    """Times a checkpoint re-plan from its apply to the next step's open."""

    def __init__(self, db: LedgerDB, events: EventLog, cfg: SchedulerConfig):
        self.db, self.events, self.cfg = db, events, cfg

    def started(self, stall_layers: int) -> None:
        """A pending plan has just applied at a checkpoint; its busiest loader fetches `stall_layers`."""
        self.db.set_json_meta(_STARTED, {"at": self.db.clock(), "stall_layers": stall_layers})

    def step_opened(self) -> None:
        """A step has opened: if a re-plan's reloads were being timed, that time is measured."""
        started = self._take()
        if started is None:
            return
        held = max(0.0, self.db.clock() - started["at"])
        priced = started["stall_layers"] * self.cfg.layer_load_s
        reload = max(0.0, held - priced)
        self.db.set_meta(_RELOAD, reload)
        self.events.record("measured", f"a re-plan at a checkpoint held the run {held:.3g} s, {reload:.3g} s of it "
                           f"beyond its {started['stall_layers']} layer load(s) at scheduler.layer_load_s "
                           f"{self.cfg.layer_load_s:g} s: later re-plans that reload a stage are priced that much more")

    def interrupted(self, why: str) -> None:
        """A failure's restore (`why`) came before the next step's open: no timing of this re-plan is clean."""
        if self._take() is None:
            return
        self.events.record("measured", f"the re-plan applied at a checkpoint is not timed: a failure's restore came "
                           f"while its stages reloaded ({why}); later re-plans stay priced at the last clean "
                           f"reload, {self.reload_s():.3g} s")

    def _take(self) -> dict | None:
        """The timing in progress ({at, stall_layers}; None if none), ended: each re-plan is timed once."""
        started = self.db.json_meta(_STARTED, None)
        if started is not None:
            self.db.set_meta(_STARTED, "")
        return started

    def reload_s(self) -> float:
        """The last measured reload (0 before any): seconds a re-plan that reloads a stage costs beyond its layer loads."""
        return float(self.db.meta(_RELOAD) or 0.0)
