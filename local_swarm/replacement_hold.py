"""The chaos soak's hold: ticket issue paused while the replacements it started are loading.

A worker can take ~40 s to start on two loaded cores, longer than a 1 x 2 swarm takes for the
rest of a short run. Without the hold, the run ends on a shrunken swarm where an averaging fault
has no round to hit, and how many faults a soak sees depends on the machine. With it, each fault
lands on a full swarm. The hold is the operator's pause (`gptjt pause` / `resume`, sent as one
RPC), as an operator waiting for volunteers would use it: the step open at the pause finishes,
and a replacement that loads joins the next open step (steps.admit_to_open_step).
"""

from __future__ import annotations

from .swarm import LocalSwarm, SwarmFailed

STANDBY_SETTLED_S = 2.0
"""A replacement the plan keeps in standby counts as loaded once it has stayed there this long:
joining passes through standby for a moment on its way to a stage."""


class ReplacementHold:
    """Pauses the run while replacements load; `update` once per soak tick."""

    def __init__(self, swarm: LocalSwarm, limit_s: float, seed: int):
        self.swarm, self.limit_s, self.seed = swarm, limit_s, seed
        self.loading: dict[str, float] = {}  # name -> monotonic time first seen in standby (0.0: not yet)
        self.held_since: float | None = None  # monotonic time of the current hold's pause
        self.held_s = 0.0
        """Seconds held so far, over every hold that has ended."""

    def started(self, name: str) -> None:
        self.loading[name] = 0.0

    def gone(self, name: str) -> None:
        """The soak killed `name`, or it exited: nothing to wait for."""
        self.loading.pop(name, None)

    def update(self, status: dict | None, now: float) -> tuple[bool, float]:
        """(holding, seconds of the hold that ended at this tick, else 0.0). With no status (the
        coordinator restarting) a hold goes on and none begins."""
        if status is None:
            return self.held_since is not None, 0.0
        self._settle(status, now)
        if self.held_since is None:
            if not self.loading or status["phase"] == "done":
                return False, 0.0
            self.swarm.set_paused(True)
            self.held_since = now
            return True, 0.0
        if self.loading:
            if now - self.held_since > self.limit_s:
                raise SwarmFailed(f"seed {self.seed}: replacement(s) {sorted(self.loading)} did not load within "
                                  f"{self.limit_s:.0f} s of the pause\n{self.swarm.logs_tail(1500)}")
            return True, 0.0
        self.swarm.set_paused(False)
        ended, self.held_since = now - self.held_since, None
        self.held_s += ended
        return False, ended

    def total_s(self, now: float) -> float:
        """Seconds held, counting a hold still going on at `now`."""
        return self.held_s + (now - self.held_since if self.held_since is not None else 0.0)

    def _settle(self, status: dict, now: float) -> None:
        by_name = {w["name"]: w for w in status["workers"] if w["state"] not in ("dead", "left")}
        for name in list(self.loading):
            w = by_name.get(name)
            if w is not None and w["state"] == "ready" and w["stage"] >= 0:
                del self.loading[name]
            elif w is not None and w["state"] == "standby":
                self.loading[name] = self.loading[name] or now
                if now - self.loading[name] >= STANDBY_SETTLED_S:
                    del self.loading[name]
            else:
                self.loading[name] = 0.0
