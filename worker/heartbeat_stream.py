"""The worker's heartbeats as messages of one stream it holds open to the coordinator.

Coordinator.Heartbeats answers each HeartbeatRequest with a HeartbeatReply, in order. One
message costs the coordinator ~3.5x less gRPC CPU than a Heartbeat call of its own
(coordinator/heartbeats.py), which is what lets one coordinator keep up with thousands of
workers. To the caller a beat on the stream is a call like any other: it ends with the reply,
or with a grpc.aio.AioRpcError whose code says what happened (UNAUTHENTICATED: the session
ended; DEADLINE_EXCEEDED: no reply in time; UNAVAILABLE: the coordinator is gone), so
CoordinatorClient retries it and moves to a standby coordinator as it does every call.
"""

from __future__ import annotations

import asyncio

import grpc

from gptjt_proto import coordinator_pb2 as pb


def _failure(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class HeartbeatStream:
    """One Heartbeats stream at a time: opened at the first beat, and again at the next beat
    after it failed or the client moved to another coordinator or session. One beat is in
    flight at a time, so replies pair with requests by order."""

    def __init__(self) -> None:
        self._call: grpc.aio.StreamStreamCall | None = None
        self._opened_with: tuple = ()  # (stub, metadata) the open stream was made with
        self._one_at_a_time = asyncio.Lock()

    async def beat(self, stub, metadata: tuple, request: pb.HeartbeatRequest, timeout_s: float) -> pb.HeartbeatReply:
        """Send `request` on the stream to `stub`'s coordinator (opening one with `metadata`, the
        worker's session, if none is open to it) and return its reply within `timeout_s` seconds."""
        async with self._one_at_a_time:
            if self._call is None or self._opened_with != (stub, metadata):
                self.close()
                self._call, self._opened_with = stub.Heartbeats(metadata=metadata), (stub, metadata)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the reply instead of
                # raising when the caller is cancelled as the reply arrives, and a worker (or one of
                # bench heartbeat's 10,000) cancelled at its end would then beat on forever.
                async with asyncio.timeout(timeout_s):
                    reply = await self._round_trip(self._call, request)
            except asyncio.CancelledError:
                self.close()  # its reply may still come: read by the next beat, it would answer the wrong request
                raise
            except TimeoutError:
                self.close()
                raise _failure(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no heartbeat reply within {timeout_s:.0f} s on the heartbeat stream") from None
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                self.close()  # the next beat opens a new stream
                if isinstance(e, grpc.aio.AioRpcError):
                    raise
                raise _failure(grpc.StatusCode.UNAVAILABLE, f"the heartbeat stream had ended ({e})") from None
            if reply is grpc.aio.EOF:
                self.close()
                raise _failure(grpc.StatusCode.UNAVAILABLE, "the coordinator ended the heartbeat stream")
            return reply

    @staticmethod
    async def _round_trip(call: grpc.aio.StreamStreamCall, request: pb.HeartbeatRequest):
        await call.write(request)
        return await call.read()

    def close(self) -> None:
        """End the open stream, if any (the worker leaves, or the stream failed)."""
        if self._call is not None:
            self._call.cancel()
        self._call, self._opened_with = None, ()
