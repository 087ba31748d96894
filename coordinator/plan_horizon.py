"""What a plan change must pay back before the scheduler makes it (hysteresis).

A re-plan in the middle of a run holds it up: its workers reload their stages (from the store
at a checkpoint) and fetch the layers they did not hold. It is worth that only if the new plan's
faster steps win the time back over the steps still to come.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptjt_core.config import SchedulerConfig

from .placement import move_cost_s


@dataclass(frozen=True)
class Horizon:
    """What a plan change must pay back: its predicted saving over `steps` steps against the stall
    of its moves (placement.move_cost_s: `layer_load_s` a layer the busiest loader fetches, plus
    `reload_s` once when a holder reloads)."""
    steps: int
    layer_load_s: float
    reload_s: float = 0.0

    @staticmethod
    def of(cfg: SchedulerConfig, steps_left: int | None = None, reload_s: float = 0.0) -> Horizon:
        """scheduler.horizon_steps, or `steps_left` when fewer (the ledger passes the steps the
        run has left once its first step has opened: a saving cannot pay back on steps the run will
        not take; a 9-step chaos soak moved 4 layers after step 2 for a 4 % faster step, and its
        reloads held it 15 s, five steps' worth)."""
        steps = cfg.horizon_steps if steps_left is None else max(1, min(cfg.horizon_steps, steps_left))
        return Horizon(steps, cfg.layer_load_s, reload_s)

    def cost_s(self, step_s: float, before: list, after: list) -> float:
        """A plan `after` at `step_s` a step: its seconds over the horizon plus its moves' stall
        from `before` (stages with start, end and workers, as placement.move_cost_s takes)."""
        return step_s * self.steps + move_cost_s(before, after, self.layer_load_s, self.reload_s)
