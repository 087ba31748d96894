"""Pipeline schedules as pure decisions: what one stage does next, and whether stage 0 admits another micro-batch.

In the style of picotron, the schedule is apart from the transport: nothing here sends,
waits or computes. Three pieces, each used by the worker:

- `micro_batch_plan(position)`: the order of work for one micro-batch at one stage (its
  data dependencies: receive, forward, send, receive the gradient, backward, send it back).
  `worker/micro_batch_work.py` does exactly this order.
- `Schedule.pick(ready)`: which compute job queued at a stage runs next. The stage's compute
  thread (`worker/compute.py`) asks it before every job.
- `Schedule.admissible(in_flight, admitted)`: how many more micro-batches stage 0 may start
  now. Stage 0's driver (`worker/pipeline.py`) asks it before every lease.

`next_action` puts them together for one stage at one moment (send, receive, forward,
backward or wait); the tests run whole pipelines with it alone.

Schedules:
- `OneFOneB` (the one the worker runs): a stage runs a ready backward before any forward
  (it frees activations early), and stage 0 keeps at most `in_flight` micro-batches in the
  pipeline. 1F1B is not a fixed plan here but the result of these two rules on a live
  pipeline; the tests show it reproduces the textbook order where the timing allows.
- `GPipe` (the flush schedule): every forward of a step, then every backward. It is a
  tested pure schedule only; the worker does not run it, because a stage cannot know how
  many of a step's micro-batches it will see (replicas share them by load) and the last
  stage runs its forward and backward as one job. Wiring it would need both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Action(enum.Enum):
    """What a stage does next."""

    RECEIVE = "receive"  # take a message a neighbour sent: activations, or a gradient
    FORWARD = "forward"
    SEND = "send"  # activations to the next stage, or a gradient to the previous one
    BACKWARD = "backward"
    OTHER = "other"  # a compute job outside any micro-batch: admit a step, discard, optimizer step, checkpoint
    WAIT = "wait"


@dataclass(frozen=True)
class Position:
    """Where a stage sits in the pipeline."""

    index: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.num_stages < 1 or not 0 <= self.index < self.num_stages:
            raise ValueError(f"stage position {self.index} of {self.num_stages}: need num_stages >= 1 "
                             f"and 0 <= index < num_stages")

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


def micro_batch_plan(position: Position) -> tuple[Action, ...]:
    """The order of work for one micro-batch at this stage. Stage 0 reads its tokens itself (no
    first receive) and has no stage before it (no last send); the last stage's forward ends in
    the loss, so its backward needs nothing from downstream."""
    plan = [] if position.first else [Action.RECEIVE]  # activations from the stage before
    plan.append(Action.FORWARD)
    if not position.last:
        plan += [Action.SEND, Action.RECEIVE]  # activations down, their gradient back
    plan.append(Action.BACKWARD)
    if not position.first:
        plan.append(Action.SEND)  # the gradient of our input, to the stage before
    return tuple(plan)


@dataclass(frozen=True)
class Job:
    """A compute job queued at a stage."""

    action: Action  # FORWARD, BACKWARD or OTHER
    order: int  # when it was queued: among jobs of one kind the oldest runs first
    micro_batch: int | None = None  # which micro-batch it works on, where the caller tracks that


def _oldest(ready: Sequence[Job], action: Action) -> Job | None:
    return min((j for j in ready if j.action is action), key=lambda j: j.order, default=None)


class OneFOneB:
    """One forward, one backward: backward first at every stage, at most `in_flight`
    micro-batches between stage 0's forward and its backward."""

    name = "1f1b"

    def __init__(self, in_flight: int):
        if in_flight < 1:
            raise ValueError(f"1F1B in-flight bound {in_flight}: need at least 1 micro-batch")
        self.in_flight = in_flight

    def admissible(self, in_flight: int, admitted: int = 0) -> int:
        """How many more micro-batches stage 0 may start, with `in_flight` started and not yet
        finished (`admitted` in this step: 1F1B does not look at it)."""
        return max(0, self.in_flight - in_flight)

    @staticmethod
    def pick(ready: Sequence[Job], forwards_left: int = 0) -> Job | None:
        """The oldest backward, else the oldest forward, else the oldest other job; None only
        when nothing is ready. A backward first frees its activations and moves the micro-batch
        closer to its commit. The order needs no parameter (`forwards_left` is for flush
        schedules), so a compute queue can ask it before the run's settings are known."""
        for action in (Action.BACKWARD, Action.FORWARD, Action.OTHER):
            job = _oldest(ready, action)
            if job is not None:
                return job
        return None


class GPipe:
    """GPipe with a flush: stage 0 starts all `micro_batches` of a step at once; every stage
    runs all of the step's forwards, then its backwards."""

    name = "gpipe"

    def __init__(self, micro_batches: int):
        if micro_batches < 1:
            raise ValueError(f"GPipe micro-batches per step {micro_batches}: need at least 1")
        self.micro_batches = micro_batches

    def admissible(self, in_flight: int, admitted: int = 0) -> int:
        """The step's micro-batches not yet started (`admitted` of them are), whatever is in flight."""
        return max(0, self.micro_batches - admitted)

    @staticmethod
    def pick(ready: Sequence[Job], forwards_left: int = 0) -> Job | None:
        """The oldest forward; a backward only once the stage has no forward of the step left to
        run (`forwards_left`, counting ready ones: the flush); else an other job. None: wait."""
        job = _oldest(ready, Action.FORWARD)
        if job is None and forwards_left <= 0:
            job = _oldest(ready, Action.BACKWARD)
        return job or _oldest(ready, Action.OTHER)


Schedule = OneFOneB | GPipe


@dataclass(frozen=True)
class InFlight:
    """One micro-batch at one stage, as far as the schedule needs to know."""

    micro_batch: int
    done: int = 0  # how many actions of micro_batch_plan(position) this stage has done for it
    arrived: bool = False  # the message its next RECEIVE takes is here
    order: int = 0  # when its next action became possible: among equals the smallest goes first


@dataclass(frozen=True)
class Decision:
    """What a stage does next (and which job), per the schedule."""
    action: Action
    micro_batch: int | None = None  # None with WAIT


def next_action(schedule: Schedule, position: Position, in_flight: Sequence[InFlight],
                forwards_left: int = 0) -> Decision:
    """What this stage does now. Sends and receives go first, oldest first: they are I/O,
    which the transport runs beside compute, so they never wait for the schedule's choice.
    Then the schedule picks among the ready forwards and backwards (`forwards_left`: this
    step's forwards the stage has still to run, for flush schedules). Else WAIT."""
    plan = micro_batch_plan(position)
    upcoming = sorted(((plan[m.done], m) for m in in_flight if m.done < len(plan)),
                      key=lambda am: (am[1].order, am[1].micro_batch))
    for action, m in upcoming:
        if action is Action.SEND or (action is Action.RECEIVE and m.arrived):
            return Decision(action, m.micro_batch)
    ready = [Job(action, m.order, m.micro_batch) for action, m in upcoming
             if action in (Action.FORWARD, Action.BACKWARD)]
    job = schedule.pick(ready, forwards_left)
    return Decision(job.action, job.micro_batch) if job is not None else Decision(Action.WAIT)
