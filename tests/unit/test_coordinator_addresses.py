"""A worker given several coordinator addresses (gptjt-worker --join A,B) moves to the one that
leads: a standby answers every call UNAVAILABLE (coordinator/standby.py), and calls that fail
together at one address move the worker on once, not once each."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coordinator.standby import STANDBY_DETAIL, RefuseEverything
from gptjt_proto import coordinator_pb2 as pb
from gptjt_proto import coordinator_pb2_grpc as pb_grpc
from worker.membership import CoordinatorClient


class Leader(pb_grpc.CoordinatorServicer):
    """Answers heartbeats and checkpoint downloads only (the rest of the API is not on this path)."""

    def __init__(self):
        self.beats = 0

    async def Heartbeats(self, request_iterator, context):
        async for _ in request_iterator:
            self.beats += 1
            yield pb.HeartbeatReply(known=True)

    async def GetCheckpoint(self, request, context):
        for part in (b"layers ", f"{request.start_layer}-{request.end_layer}".encode()):
            yield pb.CheckpointChunk(data=part)


async def _serve(*, leader: Leader | None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(handlers=[] if leader else [RefuseEverything()])
    if leader is not None:
        pb_grpc.add_CoordinatorServicer_to_server(leader, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_worker_moves_past_a_standby_to_the_leader_and_stays_there():
    async def scenario():
        leader = Leader()
        standby, standby_at = await _serve(leader=None)
        active, active_at = await _serve(leader=leader)
        client = CoordinatorClient(f"{standby_at}, {active_at}", retry_for_s=10.0)
        try:
            with_standby = CoordinatorClient(standby_at, retry_for_s=0.0)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await with_standby.heartbeat("w", pb.STANDBY, {}, -1)
            await with_standby.close()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and refused.value.details() == STANDBY_DETAIL
            known, _ = await client.heartbeat("w", pb.STANDBY, {}, -1)
            assert known and client.address == active_at and leader.beats == 1
            for _ in range(3):
                await client.heartbeat("w", pb.STANDBY, {}, -1)
            assert client.address == active_at and leader.beats == 4  # it stays with the one that answers
        finally:
            await client.close()
            await standby.stop(None)
            await active.stop(None)

    asyncio.run(scenario())


def test_calls_failing_together_at_one_address_move_on_once():
    async def scenario():
        client = CoordinatorClient("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3")
        error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        for _ in range(3):  # three calls that were all made to the first address
            client._move_on(error, "127.0.0.1:1")
        assert client.address == "127.0.0.1:2"
        client._move_on(error, "127.0.0.1:2")
        client._move_on(error, "127.0.0.1:3")
        assert client.address == "127.0.0.1:1"  # round the list
        single = CoordinatorClient("127.0.0.1:9")
        single._move_on(error, "127.0.0.1:9")
        assert single.address == "127.0.0.1:9"
        await client.close()
        await single.close()

    asyncio.run(scenario())


def test_no_address_is_refused_with_what_to_give():
    with pytest.raises(ValueError, match=r"HOST:PORT\[,HOST:PORT\.\.\.\]"):
        CoordinatorClient(" , ")


def test_a_checkpoint_download_moves_past_a_standby_to_the_leader():
    """A worker loading its stage when the active coordinator died fetches from the one that took
    over instead of failing the load."""
    async def scenario():
        standby, standby_at = await _serve(leader=None)
        active, active_at = await _serve(leader=Leader())
        client = CoordinatorClient(f"{standby_at},{active_at}", retry_for_s=10.0)
        try:
            spec = type("Spec", (), {"start": 2, "end": 5, "embed": False, "head": False})()
            assert await client.get_checkpoint(10, spec) == b"layers 2-5"
            assert client.address == active_at
            alone = CoordinatorClient(standby_at, retry_for_s=0.0)  # nowhere to move: the refusal is raised
            try:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await alone.get_checkpoint(10, spec)
            finally:
                await alone.close()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await client.close()
            await standby.stop(None)
            await active.stop(None)

    asyncio.run(scenario())


def test_a_join_nobody_answers_says_so_while_it_tries_and_ends_with_what_to_check(caplog):
    # a port that was free a moment ago: nothing listens there
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"

    async def scenario():
        client = CoordinatorClient(nobody, retry_for_s=1.0)
        try:
            with pytest.raises(RuntimeError, match=rf"no coordinator at {nobody} answered for 1 s \(last: UNAVAILABLE\)"
                                                   r".*check the --join HOST:PORT"):
                await client.join("gptjt_token", "w", "127.0.0.1:1", {"kind": "cpu"})
        finally:
            await client.close()

    with caplog.at_level("INFO", logger="worker.membership"):
        asyncio.run(scenario())
    tries = [r.getMessage() for r in caplog.records if r.name == "worker.membership"]
    assert tries and all(f"join at coordinator {nobody} failed (UNAVAILABLE)" in t for t in tries)
