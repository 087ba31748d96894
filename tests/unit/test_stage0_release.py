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
