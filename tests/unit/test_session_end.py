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
