"""Any coordinator call may be the first to hear that this worker's session ended: the worker
then joins again, it does not exit with an error (the chaos soak found a checkpoint upload after a
stall doing that)."""

from __future__ import annotations

import grpc
import pytest

from worker.membership import session_ended
from worker.options import WorkerOptions
from worker.runner import WorkerRunner


def _refusal(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="no valid session for worker 'w': join the run first")


@pytest.fixture
def runner():
    r = WorkerRunner(WorkerOptions(coordinator="127.0.0.1:1"))
    yield r
    r.compute.close()


def test_an_ended_session_seen_by_any_loop_means_join_again(runner):
    runner._fail(_refusal(grpc.StatusCode.UNAUTHENTICATED))  # e.g. PutCheckpoint from the step follower
    assert runner.stopping.is_set() and runner.declared_dead and not runner.failed


def test_a_worker_that_is_leaving_does_not_join_again(runner):
    runner.leaving = True
    runner._fail(_refusal(grpc.StatusCode.UNAUTHENTICATED))
    assert runner.stopping.is_set() and not runner.declared_dead and not runner.failed


@pytest.mark.parametrize("error", [_refusal(grpc.StatusCode.INVALID_ARGUMENT), RuntimeError("a bug")])
def test_other_failures_still_stop_the_worker_with_an_error(runner, error):
    runner._fail(error)
    assert runner.stopping.is_set() and runner.failed and not runner.declared_dead


def test_only_an_unauthenticated_refusal_is_an_ended_session():
    assert session_ended(_refusal(grpc.StatusCode.UNAUTHENTICATED))
    assert not session_ended(_refusal(grpc.StatusCode.UNAVAILABLE))
    assert not session_ended(PermissionError("UNAUTHENTICATED"))


def test_a_drain_after_the_run_finished_leaves_at_once_even_with_the_coordinator_gone(runner, capsys):
    """A finished swarm is stopped all at once: the coordinator may never acknowledge DRAINING, and
    waiting for it held every worker until SIGKILL (10 s per swarm in the tests)."""
    import asyncio
    import time

    from gptjt_proto import coordinator_pb2 as cpb
    from worker.drain import drain_and_leave
    from worker.membership import CoordinatorClient

    runner.worker_id, runner.state = "w", cpb.RunState(step=5, phase=cpb.DONE)

    async def drain():
        runner.coordinator = CoordinatorClient("127.0.0.1:1")  # nobody listens there
        started = time.monotonic()
        await drain_and_leave(runner)  # the coordinator at 127.0.0.1:1 refuses the Leave
        return time.monotonic() - started

    took = asyncio.run(drain())
    assert runner.stopping.is_set() and "w left the run" in capsys.readouterr().out
    assert took < runner.options.drain_timeout_s / 2, took
