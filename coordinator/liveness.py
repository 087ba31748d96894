"""When a step phase is stuck, and what to do about it: pure rules over facts the ledger gathers.

A run must never stop because of one peer. Every phase of the step protocol has a deadline;
a phase past it is a Stall with a cause (who did not do what) and a remedy the ledger applies:

  OPEN         no micro-batch committed for coordinator.phase_timeout_s (the run not paused):
               restart the step (in-flight work is dropped, every ticket re-issued); after
               coordinator.max_stall_restarts restarts of the same step, drop the workers
               that hold the stalled leases instead.
  ACCUMULATED  a member has not reported its gradient norm within phase_timeout_s:
  APPLYING     a member has not reported its update within phase_timeout_s:
               drop those members, as if they had died (their stage carries on with its other
               replicas, or is restored).
  AVERAGING    a stage's replicas have not all reported their sum within 3 x
               averaging.timeout_s: restart the step; after averaging.max_restarts restarts of
               the same step, that stage falls back to one replica (the others are held out
               of it for averaging.fallback_steps steps), so the step needs no round there.
               At once, without the deadline, when a replica's round failed after every other
               replica of its stage had its sum: it is stranded (a round that one side finished
               and the other lost parts of, seen on loaded machines), and no retry can succeed,
               since a replica with its sum never rounds again in that attempt.
WAITING is not judged: it waits for workers to join or load, which no remedy hastens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RESTART_STEP, DROP_WORKERS, REDUCE_REPLICAS = "restart_step", "drop_workers", "reduce_replicas"


@dataclass(frozen=True)
class Limits:
    """Deadlines and retry bounds, from the run config (seconds, counts)."""
    phase_timeout_s: float
    averaging_timeout_s: float  # the whole AVERAGING phase (3 x averaging.timeout_s)
    max_stall_restarts: int
    max_averaging_restarts: int


@dataclass
class PhaseFacts:
    """What the ledger knows about the open step's current phase."""

    phase: str
    age_s: float  # since the phase began
    idle_s: float  # since the last progress in it (a commit, a report), or since it began
    paused: bool
    members: dict[int, list[str]]  # stage -> member replicas of the step
    reported: set[str]  # members that sent this phase's report
    leases: dict[str, int] = field(default_factory=dict)  # OPEN: worker -> tickets it holds
    restarts: int = 0  # times the liveness rules already restarted this step
    causes: dict[str, str] = field(default_factory=dict)  # worker -> why its averaging failed
    # members whose round failed after every other member of their stage reported its sum
    stranded: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Stall:
    """A phase past its deadline: why, and the remedy to apply."""
    phase: str
    cause: str
    remedy: str  # RESTART_STEP | DROP_WORKERS | REDUCE_REPLICAS
    workers: tuple[str, ...] = ()  # whom DROP_WORKERS drops
    stages: tuple[int, ...] = ()  # which stages REDUCE_REPLICAS reduces to one replica


def judge(facts: PhaseFacts, limits: Limits) -> Stall | None:
    """The stall of the current phase, or None while it is within its deadline."""
    f = facts
    if f.phase == "open":
        return _judge_open(f, limits)
    if f.phase in ("accumulated", "applying"):
        if f.age_s <= limits.phase_timeout_s:
            return None
        silent = tuple(sorted(w for ids in f.members.values() for w in ids if w not in f.reported))
        if not silent:
            return None
        what = "gradient norm" if f.phase == "accumulated" else "applied update"
        return Stall(f.phase, f"member(s) {', '.join(silent)} sent no {what} within {limits.phase_timeout_s:.0f} s",
                     DROP_WORKERS, workers=silent)
    if f.phase == "averaging":
        stranded = tuple(s for s, ids in sorted(f.members.items())
                         if any(w in f.stranded and w not in f.reported for w in ids))
        if not stranded and f.age_s <= limits.averaging_timeout_s:
            return None
        stuck = stranded or tuple(s for s, ids in sorted(f.members.items()) if any(w not in f.reported for w in ids))
        if not stuck:
            return None
        causes = "; ".join(f"{w}: {f.causes[w]}" for ids in (f.members[s] for s in stuck) for w in ids
                           if w in f.causes) or "no replica reported a failed round"
        if stranded:
            alone = ", ".join(w for s in stuck for w in f.members[s] if w in f.stranded and w not in f.reported)
            cause = (f"stage(s) {', '.join(map(str, stuck))}: {alone}'s round failed after the other replica(s) "
                     f"had their sum, so nobody is left to average with ({causes})")
        else:
            cause = (f"stage(s) {', '.join(map(str, stuck))} did not finish averaging within "
                     f"{limits.averaging_timeout_s:.0f} s ({causes})")
        if f.restarts < limits.max_averaging_restarts:
            return Stall(f.phase, cause, RESTART_STEP, stages=stuck)
        return Stall(f.phase, cause, REDUCE_REPLICAS, stages=stuck)
    return None


def _judge_open(f: PhaseFacts, limits: Limits) -> Stall | None:
    if f.paused or f.idle_s <= limits.phase_timeout_s:
        return None
    holders = tuple(sorted(w for w, n in f.leases.items() if n > 0))
    held = ", ".join(f"{w} holds {f.leases[w]}" for w in holders) or "no ticket is leased"
    cause = f"no micro-batch committed for {f.idle_s:.0f} s ({held})"
    if f.restarts < limits.max_stall_restarts or not holders:
        return Stall(f.phase, cause, RESTART_STEP)
    return Stall(f.phase, cause, DROP_WORKERS, workers=holders)


def remedy_text(stall: Stall, restarts: int, limits: Limits) -> str:
    """How the event names the remedy taken."""
    if stall.remedy == RESTART_STEP:
        bound = limits.max_averaging_restarts if stall.phase == "averaging" else limits.max_stall_restarts
        then = ("stage(s) fall back to one replica" if stall.phase == "averaging"
                else "the workers holding the stalled leases are dropped")
        return f"restarting the step (restart {restarts + 1} of {bound}; then {then})"
    if stall.remedy == DROP_WORKERS:
        return f"dropping {', '.join(stall.workers)} as dead (a live one joins again as a new worker)"
    return f"stage(s) {', '.join(map(str, stall.stages))} continue with one replica"
