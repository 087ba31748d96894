"""Leaving a run gracefully: announce it, finish the open step, hand back leases, save the last replica's stage, leave."""

from __future__ import annotations

import asyncio
import logging
import time
import grpc

from gptjt_core.event_wait import wait_for_event
from gptjt_proto import coordinator_pb2 as cpb

log = logging.getLogger("gptjt.worker")

# Phases in which a stage's weights and optimizer state are still those the step started from
# (APPLYING changes them).
WEIGHTS_UNCHANGED = (cpb.WAITING, cpb.OPEN, cpb.ACCUMULATED, cpb.AVERAGING)


async def drain_and_leave(runner) -> None:
    """The drain a SIGTERM, `gptjt drain` or the dashboard asks for. `runner`: the
    worker.runner.WorkerRunner leaving (not imported here: the runner imports this module)."""
    state = runner.state
    if state is not None and state.phase == cpb.DONE:
        # The run is over: no step to finish, no lease to hand back, no stage the run still
        # needs. Say goodbye and stop now (the coordinator may be stopping too: tests and
        # operators stop a finished swarm all at once, and an unanswered drain would wait).
        await _leave(runner)
        return
    drain_step = state.step if state is not None else -1
    deadline = time.monotonic() + runner.options.drain_timeout_s
    runner.status = cpb.DRAINING
    # Tell the coordinator first: a draining worker is no member of the next step, so a stage
    # whose only worker is leaving opens no step that would have to be re-run without it.
    # Told only at the next beat (seconds), a short step could close first, the next one
    # open with us as its member, and our leave restart it.
    runner.heartbeat_soon()
    while runner.reported_status != cpb.DRAINING and time.monotonic() < deadline and not runner.stopping.is_set():
        await asyncio.sleep(0.05)
    # Keep serving until the step that was open when the drain began has closed, so its
    # work is not redone; a paused run closes no step, so there is nothing to wait for.
    while (runner.stage is not None and runner.state is not None and runner.state.phase not in (cpb.DONE, cpb.WAITING)
           and runner.state.step <= drain_step and not runner.state.paused and time.monotonic() < deadline):
        runner.state_changed.clear()
        await wait_for_event(runner.state_changed, 0.5)
    if runner.driver is not None:
        await runner.driver.stop()  # hands back anything still leased
    if (runner.stage is not None and runner.state is not None and runner.state.phase in WEIGHTS_UNCHANGED
            and runner.stage.position == runner.state.step and not runner.state.assignment.peer_addresses):
        # The stage's last replica, with the weights the open step started from: leave them
        # in the store so a newcomer continues from this step (only its partial work is
        # redone) instead of the run rolling back to the last checkpoint.
        try:
            await runner.follower.save_checkpoint(runner.stage, runner.stage.position)
        except grpc.aio.AioRpcError as e:
            log.warning("could not save the stage before leaving (%s); the run will roll back", e.details())
    await _leave(runner)


async def _leave(runner) -> None:
    try:
        await runner.coordinator.leave(runner.worker_id)
    except grpc.aio.AioRpcError as e:
        log.warning("could not tell the coordinator we leave (%s); it will time us out", e.code().name)
    print(f"gptjt-worker: {runner.worker_id} left the run", flush=True)
    runner.stopping.set()
