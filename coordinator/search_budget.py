"""How much one placement search may do: a count of candidate evaluations, the clock a backstop."""

from __future__ import annotations

import time
from typing import Callable


class SearchBudget:
    """Candidate layouts a search may score, and a wall-clock backstop.

    The count bounds the work, so the same inputs give the same plan on any machine however
    loaded it is: the clock never decides which candidates are tried. The backstop is only
    for pathological inputs (thousands of workers, a huge count): at the default settings
    it should never bind, and `bench scheduler` reports whether it did (`backstop_hit`).
    When it binds, the search returns the best plan found so far, which then depends on the
    machine's speed.
    """

    def __init__(self, evaluations: int, backstop_s: float, clock: Callable[[], float] | None = None):
        if evaluations < 0 or backstop_s < 0:
            raise ValueError(f"a search budget needs evaluations >= 0 and backstop_s >= 0, not "
                             f"{evaluations} and {backstop_s}")
        self.evaluations = evaluations
        self.used = 0  # evaluations taken so far
        self.backstop_hit = False  # the clock passed the backstop (sticky)
        # Read at call time (not bound at import) so a test can stand in a fast clock.
        self._clock = clock or time.perf_counter
        self._deadline = self._clock() + backstop_s

    def take(self, limit: int | None = None) -> bool:
        """Spend one evaluation; False (nothing spent) once `used` has reached `limit` (default:
        the whole budget; a caller sharing the budget between parts passes its part's end) or
        the backstop has passed."""
        end = self.evaluations if limit is None else min(limit, self.evaluations)
        if self.used >= end or self.out_of_time():
            return False
        self.used += 1
        return True

    def share(self, parts: int) -> int:
        """The `limit` that gives the next of `parts` remaining parts an equal share of what is
        left (a part that finishes early leaves its rest to the parts after it)."""
        return self.used + (self.evaluations - self.used) // max(parts, 1)

    def out_of_time(self) -> bool:
        if not self.backstop_hit and self._clock() >= self._deadline:
            self.backstop_hit = True
        return self.backstop_hit
