"""Pipeline schedules (gptjt_core/schedule.py): whole pipelines of 1-4 stages run step by step
with the pure module alone. Every action takes one tick; a message sent in one tick can be
received from the next."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from gptjt_core.schedule import (Action, Decision, GPipe, InFlight, Job, OneFOneB, Position, micro_batch_plan,
                                 next_action)

F, B = Action.FORWARD, Action.BACKWARD


@dataclass
class Run:
    """What a simulated pipeline did."""

    compute: list[list[tuple[Action, int]]]  # per stage, the forwards and backwards in the order run
    ticks: dict[tuple[int, Action, int], int] = field(default_factory=dict)  # (stage, F/B, mb) -> tick
    max_in_flight: int = 0
    backward_was_ready_at_forward: bool = False  # a forward ran while a backward waited at that stage
    length: int = 0


def simulate(schedule, stages: int, micro_batches: int, max_ticks: int = 2000) -> Run:
    positions = [Position(k, stages) for k in range(stages)]
    plans = [micro_batch_plan(p) for p in positions]
    at: list[dict[int, InFlight]] = [{} for _ in range(stages)]  # per stage, micro-batch -> progress
    forwards_run = [0] * stages
    run = Run([[] for _ in range(stages)])
    admitted = finished = 0
    for tick in range(max_ticks):
        if finished == micro_batches:
            run.length = tick
            return run
        in_flight = admitted - finished
        new = min(schedule.admissible(in_flight, admitted), micro_batches - admitted)
        for mb in range(admitted, admitted + new):
            at[0][mb] = InFlight(mb, order=tick)
        admitted += new
        run.max_in_flight = max(run.max_in_flight, admitted - finished)
        # Every stage decides on what it saw at the start of the tick, then all act at once.
        decisions = [next_action(schedule, positions[k], list(at[k].values()), micro_batches - forwards_run[k])
                     for k in range(stages)]
        deliveries = []
        for k, d in enumerate(decisions):
            if d.action is Action.WAIT:
                continue
            m = at[k][d.micro_batch]
            if d.action is F:
                forwards_run[k] += 1
                run.backward_was_ready_at_forward |= any(plans[k][o.done] is B for o in at[k].values())
            if d.action in (F, B):
                run.compute[k].append((d.action, d.micro_batch))
                run.ticks[(k, d.action, d.micro_batch)] = tick
            if d.action is Action.SEND:  # after a forward: down; after a backward: up
                down = plans[k][m.done - 1] is F
                deliveries.append((k + 1 if down else k - 1, d.micro_batch, down))
            m = replace(m, done=m.done + 1, arrived=False, order=tick)
            if m.done == len(plans[k]):
                del at[k][d.micro_batch]
                finished += k == 0
            else:
                at[k][d.micro_batch] = m
        for k, mb, down in deliveries:
            at[k][mb] = InFlight(mb, arrived=True, order=tick) if down else replace(at[k][mb], arrived=True,
                                                                                      order=tick)
    raise AssertionError(f"{schedule.name} with {stages} stages and {micro_batches} micro-batches did not finish "
                         f"in {max_ticks} ticks: stuck at {at}")


def check_dependencies(run: Run, stages: int, micro_batches: int) -> None:
    """Every micro-batch went forward through every stage, then backward in reverse, each once."""
    for k in range(stages):
        assert len(run.compute[k]) == 2 * micro_batches
        assert set(run.compute[k]) == {(a, mb) for a in (F, B) for mb in range(micro_batches)}
    for mb in range(micro_batches):
        chain = [(k, F) for k in range(stages)] + [(k, B) for k in reversed(range(stages))]
        times = [run.ticks[(k, a, mb)] for k, a in chain]
        assert times == sorted(times) and len(set(times)) == len(times), (mb, times)


def textbook_1f1b_stage0(micro_batches: int, warmup: int) -> list[tuple[Action, int]]:
    """Stage 0 of 1F1B: `warmup` forwards, then one backward for each further forward, then the
    remaining backwards."""
    warmup = min(warmup, micro_batches)
    order = [(F, mb) for mb in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [(B, i), (F, warmup + i)]
    return order + [(B, mb) for mb in range(micro_batches - warmup, micro_batches)]


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("bound", [1, 2, None])  # None: the worker's default, num_stages + 1
def test_1f1b_order_and_in_flight_bound(stages, bound):
    bound = bound or stages + 1
    micro_batches = 8
    run = simulate(OneFOneB(bound), stages, micro_batches)
    check_dependencies(run, stages, micro_batches)
    assert run.max_in_flight == min(bound, micro_batches)  # the bound holds, and is used
    assert not run.backward_was_ready_at_forward  # backward first
    # The last stage alternates: its backward is ready as soon as its forward ends.
    assert run.compute[-1] == [(a, mb) for mb in range(micro_batches) for a in (F, B)]
    # Stage 0 warms up with as many forwards as the bound lets in (one, when its backward
    # follows at once: a one-stage pipeline), then runs one backward per forward.
    assert run.compute[0] == textbook_1f1b_stage0(micro_batches, bound if stages > 1 else 1)


def held(order: list[tuple[Action, int]]) -> int:
    """The most activations a stage held at once (forwards run whose backward had not)."""
    most = now = 0
    for action, _ in order:
        now += 1 if action is F else -1
        most = max(most, now)
    return most


def test_1f1b_holds_at_most_the_bound_at_every_stage_where_gpipe_holds_the_step():
    """Why 1F1B: with 4 stages and 8 micro-batches, no stage holds more activations than the
    in-flight bound; the flush holds the whole step at every stage. Both finish every
    micro-batch in order at every stage."""
    one, flush = simulate(OneFOneB(4), 4, 8), simulate(GPipe(8), 4, 8)
    for k in range(4):
        for run in (one, flush):
            assert [mb for a, mb in run.compute[k] if a is F] == list(range(8))
            assert [mb for a, mb in run.compute[k] if a is B] == list(range(8))
        assert held(one.compute[k]) <= 4
        assert held(flush.compute[k]) == 8
    assert held(one.compute[0]) == 4 and held(one.compute[3]) == 1
    assert one.length <= flush.length  # and the flush is no faster


def test_more_in_flight_finishes_sooner_until_the_pipeline_is_full():
    lengths = [simulate(OneFOneB(bound), 4, 16).length for bound in (1, 2, 4, 8)]
    assert lengths[0] > lengths[1] > lengths[2]
    assert lengths[3] <= lengths[2]


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_gpipe_flush_runs_all_forwards_then_all_backwards(stages):
    micro_batches = 6
    run = simulate(GPipe(micro_batches), stages, micro_batches)
    check_dependencies(run, stages, micro_batches)
    for k in range(stages):
        assert run.compute[k] == [(F, mb) for mb in range(micro_batches)] + [(B, mb) for mb in range(micro_batches)]
    assert run.max_in_flight == micro_batches  # the whole step is admitted at once


def test_gpipe_admits_the_step_once_and_1f1b_refills_as_micro_batches_finish():
    assert GPipe(4).admissible(in_flight=0, admitted=0) == 4
    assert GPipe(4).admissible(in_flight=3, admitted=4) == 0
    assert OneFOneB(3).admissible(in_flight=1) == 2
    assert OneFOneB(3).admissible(in_flight=3) == 0
    assert OneFOneB(3).admissible(in_flight=5) == 0  # never negative (a bound lowered mid-step)


def test_pick_orders_queued_jobs():
    o = Action.OTHER
    jobs = [Job(o, 0), Job(F, 1), Job(F, 2), Job(B, 3), Job(B, 4)]
    assert OneFOneB.pick(jobs) == Job(B, 3)  # the oldest backward first
    assert OneFOneB.pick(jobs[:3]) == Job(F, 1)  # other jobs only when no compute of a micro-batch waits
    assert OneFOneB.pick([Job(o, 0)]) == Job(o, 0)
    assert OneFOneB.pick([]) is None
    assert GPipe.pick(jobs, forwards_left=5) == Job(F, 1)
    assert GPipe.pick(jobs[3:], forwards_left=1) is None  # a forward of the step is still to come: wait
    assert GPipe.pick(jobs[3:], forwards_left=0) == Job(B, 3)  # the flush


def test_plans_per_position():
    r, s = Action.RECEIVE, Action.SEND
    assert micro_batch_plan(Position(0, 1)) == (F, B)
    assert micro_batch_plan(Position(0, 3)) == (F, s, r, B)
    assert micro_batch_plan(Position(1, 3)) == (r, F, s, r, B, s)
    assert micro_batch_plan(Position(2, 3)) == (r, F, B, s)
    with pytest.raises(ValueError, match="stage position 3 of 3"):
        Position(3, 3)
    with pytest.raises(ValueError, match="in-flight bound 0"):
        OneFOneB(0)


def test_sends_and_receives_go_before_compute():
    pos, one = Position(1, 3), OneFOneB(4)
    ready_forward = InFlight(0, done=1, order=0)  # received; its forward is next
    gradient_here = InFlight(1, done=3, arrived=True, order=1)  # sent down; the gradient came back
    assert next_action(one, pos, [ready_forward, gradient_here]) == Decision(Action.RECEIVE, 1)
    assert next_action(one, pos, [InFlight(2, done=2), ready_forward]) == Decision(Action.SEND, 2)
    waiting = InFlight(1, done=3, arrived=False)
    assert next_action(one, pos, [ready_forward, waiting]).action is F
    assert next_action(one, pos, [waiting]).action is Action.WAIT
