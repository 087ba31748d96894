"""The run's loss scale (fp16): the scale each step attempt runs at, lowered on overflow, raised after clean steps.

The rule is gptjt_core/loss_scale.py's; this keeps its state in the ledger (meta
`loss_scale` / `loss_scale_clean`, and table `loss_scales`: the scale each (step, attempt)
ran at (0: unscaled), which a spot check of that attempt's last stage needs to recompute what was sent),
so a restarted coordinator goes on with the scale it had. Workers read the current attempt's
scale from RunState.loss_scale (1.0 when scaling is off).
"""

from __future__ import annotations

import math

from gptjt_core.config import RunConfig
from gptjt_core.loss_scale import MAX_SCALE, MIN_SCALE, ScaleState, scaling_wanted

from .db import LedgerDB
from .events import EventLog
from .rules import Contribution
from .stored_values import stored_float, stored_json


class LossScaleBook:
    """The scale in force, per step attempt."""

    def __init__(self, db: LedgerDB, events: EventLog, run: RunConfig):
        self.db, self.events, self.run = db, events, run

    def _state(self) -> ScaleState:
        raw = self.db.meta("loss_scale")
        if raw is None:
            return ScaleState(float(self.run.train.loss_scale_init))
        scale = stored_float(raw, "meta loss_scale")
        if not MIN_SCALE <= scale <= MAX_SCALE:  # NaN or out of range: a damaged ledger; start again
            return ScaleState(float(self.run.train.loss_scale_init))
        return ScaleState(scale, int(self.db.meta("loss_scale_clean") or 0))

    def _set(self, state: ScaleState) -> None:
        self.db.set_meta("loss_scale", state.scale)
        self.db.set_meta("loss_scale_clean", state.clean_steps)

    def open_attempt(self, step: int, attempt: int, member_rows: list) -> None:
        """A step attempt opens with these member workers: fix the scale it runs at (0: none, when
        train.loss_scaling does not want one for them). Decided once per attempt: an attempt that
        re-opens after losing a member keeps it, as its micro-batches so far were scaled by it."""
        dtypes = {stored_json(r["device"], {}, "workers.device").get("dtype", "") for r in member_rows}
        train = self.run.train
        scale = self._state().scale if scaling_wanted(train.loss_scaling, train.precision, dtypes) else 0.0
        self.db.execute("INSERT OR IGNORE INTO loss_scales(step, attempt, scale) VALUES(?, ?, ?)",
                        (step, attempt, scale))

    def of_attempt(self, step: int, attempt: int) -> float | None:
        """The scale (step, attempt) ran at; None: it ran unscaled (or has not opened)."""
        row = self.db.execute("SELECT scale FROM loss_scales WHERE step=? AND attempt=?", (step, attempt)).fetchone()
        if row is None or row["scale"] == 0:
            return None
        scale = stored_float(row["scale"], "loss_scales.scale")
        return scale if MIN_SCALE <= scale <= MAX_SCALE else None

    def overflowed(self, step: int, attempt: int, by_stage: dict[int, list[Contribution]]) -> str:
        """Why (step, attempt) must re-run at a lower scale, or '' (no scaling, no overflow, or
        the scale is already at its floor: then the non-finite gradient is judged as without
        scaling). Lowers the scale when it says why."""
        scale = self.of_attempt(step, attempt)
        bad = sorted((stage, c.worker) for stage, rows in by_stage.items() for c in rows if not math.isfinite(c.norm_sq))
        if scale is None or not bad:
            return ""
        lowered = ScaleState(scale).after_overflow()
        if lowered is None:
            self.events.record("loss_scale_floor", f"step {step}: non-finite gradients at loss scale {scale:g}, the "
                               f"lowest; judged as any non-finite gradient (stage, worker: {bad})")
            return ""
        self._set(lowered)
        self.events.record("loss_scale_lowered", f"step {step} attempt {attempt}: gradients overflowed at loss scale "
                           f"{scale:g} (stage, worker: {bad}); re-running the step at {lowered.scale:g}")
        return f"gradients overflowed at loss scale {scale:g}; re-running at {lowered.scale:g}"

    def closed(self, step: int, attempt: int) -> None:
        """(step, attempt) closed: a clean step at its scale counts towards doubling it."""
        scale = self.of_attempt(step, attempt)
        if scale is None:
            return
        state = self._state()
        if state.scale != scale:
            return  # the scale moved since this attempt opened (an overflow elsewhere); nothing to count
        grown = state.after_clean_step(self.run.train.loss_scale_growth_every)
        self._set(grown)
        if grown.scale != state.scale:
            self.events.record("loss_scale_raised", f"after step {step}: {self.run.train.loss_scale_growth_every} clean "
                               f"steps at loss scale {state.scale:g}; now {grown.scale:g}")
