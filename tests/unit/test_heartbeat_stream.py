"""A worker's heartbeats share one stream (worker/heartbeat_stream.py): opened once, opened again
after it fails or times out, and never left pointing at a coordinator the client moved away from.

The servers here answer Heartbeats as the coordinator does (a reply per request, in order) and
can be told to end a stream or fall silent; the coordinator's own handler is proven against real
processes in tests/integration/test_hostile.py and every swarm test."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gptjt_proto import coordinator_pb2 as pb
from gptjt_proto import coordinator_pb2_grpc as pb_grpc
from worker.heartbeat_stream import HeartbeatStream
from worker.membership import CoordinatorClient


class Beats(pb_grpc.CoordinatorServicer):
    def __init__(self):
        self.streams, self.beats = 0, 0
        self.end_next = self.silent = False
        self.sessions: list[str] = []

    async def Heartbeats(self, request_iterator, context):
        self.streams += 1
        self.sessions.append(dict(context.invocation_metadata()).get("gptjt-session", ""))
        async for request in request_iterator:
            if self.end_next:
                self.end_next = False
                await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            if self.silent:
                await asyncio.sleep(3600)
            self.beats += 1
            yield pb.HeartbeatReply(known=request.worker_id == "w")


async def _serve(servicer: Beats) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_beats_share_one_stream_and_a_broken_one_is_opened_again():
    async def scenario():
        beats = Beats()
        server, at = await _serve(beats)
        client = CoordinatorClient(at, retry_for_s=10.0)
        try:
            for _ in range(5):
                known, _ = await client.heartbeat("w", pb.STANDBY, {}, -1)
                assert known
            assert (beats.streams, beats.beats) == (1, 5)
            beats.end_next = True  # the coordinator ends the stream: the beat is retried on a new one
            known, _ = await client.heartbeat("w", pb.STANDBY, {}, -1)
            assert known and (beats.streams, beats.beats) == (2, 6)
            known, _ = await client.heartbeat("someone-else", pb.STANDBY, {}, -1)
            assert not known  # each reply pairs with its own request
            client.metadata = (("gptjt-worker", "w"), ("gptjt-session", "new"))  # joined again
            await client.heartbeat("w", pb.STANDBY, {}, -1)
            assert beats.streams == 3 and beats.sessions[-1] == "new"
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_silent_coordinator_times_the_beat_out_and_the_next_opens_a_new_stream():
    async def scenario():
        beats = Beats()
        server, at = await _serve(beats)
        client = CoordinatorClient(at, retry_for_s=0.0)  # no retries: the failure itself is seen
        try:
            await client.heartbeat("w", pb.STANDBY, {}, -1)
            beats.silent = True
            stream = client.heartbeats
            with pytest.raises(grpc.aio.AioRpcError) as timed_out:
                await stream.beat(client.stub, client.metadata, pb.HeartbeatRequest(worker_id="w"), timeout_s=0.5)
            assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            beats.silent = False
            known, _ = await client.heartbeat("w", pb.STANDBY, {}, -1)
            assert known and beats.streams == 2
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_client_that_moved_to_another_coordinator_beats_there():
    async def scenario():
        first, second = Beats(), Beats()
        server_a, at_a = await _serve(first)
        server_b, at_b = await _serve(second)
        client = CoordinatorClient(f"{at_a},{at_b}", retry_for_s=10.0)
        try:
            await client.heartbeat("w", pb.STANDBY, {}, -1)
            client._use(1)  # another call found the first unreachable (CoordinatorClient._move_on)
            await client.heartbeat("w", pb.STANDBY, {}, -1)
            assert (first.beats, second.beats) == (1, 1) and second.streams == 1
        finally:
            await client.close()
            await server_a.stop(None)
            await server_b.stop(None)

    asyncio.run(scenario())


class _ReplyOnCue:
    """A Heartbeats call whose reply comes when the test says: gRPC's own call cannot be made to
    answer in the very turn of the event loop in which its caller is cancelled."""

    def __init__(self):
        self.reply: asyncio.Future | None = None
        self.cancelled = False

    def Heartbeats(self, metadata):  # the stub's method: the call itself
        return self

    async def write(self, request):
        self.reply = asyncio.get_running_loop().create_future()

    async def read(self):
        return await self.reply

    def cancel(self):
        self.cancelled = True


def test_a_beat_cancelled_as_its_reply_arrives_ends_cancelled():
    """A worker (or bench heartbeat, at its end) cancels a beat in the turn its reply comes: the
    beat raises CancelledError, so the loop around it stops. (asyncio.wait_for on Python 3.11
    returned the reply instead, and bench heartbeat's client then beat on for ever.) The stream is
    ended too: a reply still on its way would otherwise be read as the next beat's."""
    async def scenario():
        call, stream = _ReplyOnCue(), HeartbeatStream()
        beat = asyncio.create_task(stream.beat(call, (), pb.HeartbeatRequest(worker_id="w"), timeout_s=60))
        while call.reply is None:
            await asyncio.sleep(0)
        call.reply.set_result(pb.HeartbeatReply(known=True))
        beat.cancel()
        try:
            await beat
        except asyncio.CancelledError:
            return call.cancelled
        return False

    assert asyncio.run(scenario()), "the beat returned its reply (the cancel was lost) or left its stream open"
