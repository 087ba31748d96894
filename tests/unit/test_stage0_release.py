"""Stage 0 handing tickets back when its session has ended (declared dead while stalled)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from worker.pipeline import Stage0Driver


class _Coordinator:
    """Refuses ReleaseTickets with `code`, as the coordinator's session guard does."""

    def __init__(self, code: grpc.StatusCode):
        self.code, self.calls = code, []

    async def release(self, worker_id: str, ids: list[int], reason: str = "") -> int:
        self.calls.append(ids)
        raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details=f"no valid session for worker {worker_id!r}")


def _driver(code: grpc.StatusCode) -> SimpleNamespace:
    return SimpleNamespace(worker_id="w", leased={1, 2, 3}, coordinator=_Coordinator(code))


def test_an_ended_session_does_not_kill_the_worker_on_its_way_to_join_again():
    driver = _driver(grpc.StatusCode.UNAUTHENTICATED)
    asyncio.run(Stage0Driver.release(driver, [1, 2]))
    assert driver.coordinator.calls == [[1, 2]] and driver.leased == {3}  # the coordinator took them back


def test_other_refusals_still_raise_and_keep_the_lease():
    driver = _driver(grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(Stage0Driver.release(driver, [1]))
    assert driver.leased == {1, 2, 3}


def test_stop_ends_a_lease_still_retrying_before_the_coordinator_channel_closes():
    """A worker declared dead shuts down and joins again. Its driver's lease loop was left running:
    a lease retrying an unreachable coordinator then called through the channel the runner had
    just closed, raised UsageError ("Channel is closed"), and stopped the worker with an error
    (the chaos soak, CI 2026-12-05)."""
    from gptjt_core.config import tiny_demo_config
    from worker.membership import CoordinatorClient

    failures: list[BaseException] = []

    async def main() -> None:
        coordinator = CoordinatorClient("127.0.0.1:1")  # nobody listens: every lease is retried
        stage = SimpleNamespace(spec=SimpleNamespace(embed=True, head=True))
        driver = Stage0Driver(tiny_demo_config(), None, SimpleNamespace(available=True), coordinator, "w", lambda: stage,
                              lambda: True, lambda step, attempt: 1.0)
        running = asyncio.create_task(driver.run(asyncio.Event()))
        running.add_done_callback(lambda t: t.cancelled() or t.exception() is None or failures.append(t.exception()))
        await asyncio.sleep(0.5)  # the lease has failed once and is waiting to try again
        await driver.stop()
        await coordinator.close()
        await asyncio.sleep(1.0)  # without stop() ending it, the next try used the closed channel
        assert running.done()

    asyncio.run(main())
    assert failures == []
