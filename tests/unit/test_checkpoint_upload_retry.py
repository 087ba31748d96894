"""A checkpoint upload that meets a restarting coordinator (UNAVAILABLE mid-stream) is sent whole
again instead of stopping the worker: the chaos soak (seed 12, CI) saw a worker exit 1 when the
coordinator was killed while a stage's checkpoint was streaming to it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from worker.membership import CoordinatorClient


def _error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="refused")


class FlakyStore:
    """Stands in for the gRPC stub (not our component): fails the first `failures` streams after
    reading two chunks of each, then takes a stream whole."""

    def __init__(self, failures: list[grpc.StatusCode]):
        self.failures, self.received = list(failures), []

    async def PutCheckpoint(self, chunks, timeout, metadata):
        parts = []
        for chunk in chunks:
            parts.append(chunk)
            if self.failures and len(parts) == 2:
                raise _error(self.failures.pop(0))
        self.received.append(parts)
        return SimpleNamespace(path="/store/step-3/stage")


def _upload(stub: FlakyStore, blob: bytes, retry_for_s: float = 30.0) -> str:
    async def upload():
        client = CoordinatorClient("127.0.0.1:1", retry_for_s=retry_for_s)  # a channel needs the loop
        client.stub = stub
        return await client.put_checkpoint("w", 3, SPEC, blob, chunk_bytes=1024)
    return asyncio.run(upload())


SPEC = SimpleNamespace(start=0, end=2, embed=True, head=False)


def test_an_upload_cut_off_by_an_unreachable_coordinator_is_sent_again_whole():
    stub = FlakyStore([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])
    blob = bytes(range(256)) * 40  # 10240 bytes, 10 chunks of 1024
    path = _upload(stub, blob)
    assert path == "/store/step-3/stage"
    [parts] = stub.received  # one complete stream: a header and every chunk, from the start
    assert parts[0].WhichOneof("part") == "header" and parts[0].header.nbytes == len(blob)
    assert b"".join(p.data for p in parts[1:]) == blob


def test_a_refusal_is_not_retried():
    """PERMISSION_DENIED (the plan moved the stage) and UNAUTHENTICATED (the session ended) are
    answers, not outages: they reach the step follower and the runner at once."""
    for code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        stub = FlakyStore([code])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _upload(stub, b"x" * 4096)
        assert refused.value.code() == code and stub.received == []


def test_an_outage_longer_than_retry_for_s_is_raised():
    stub = FlakyStore([grpc.StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        _upload(stub, b"x" * 4096, retry_for_s=0.5)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and stub.received == []


def test_a_stream_cut_on_the_send_is_sent_again_and_a_refusal_then_arrives_as_itself():
    """A stream the coordinator ended mid-upload fails on the client's send as INTERNAL, not with
    its status (the chaos soak, seed 12, saw the writer exit 1): sent again, it goes through, or
    meets the refusal as PERMISSION_DENIED, which the step follower handles."""
    stub = FlakyStore([grpc.StatusCode.INTERNAL])
    blob = bytes(range(256)) * 8
    assert _upload(stub, blob) == "/store/step-3/stage"
    [parts] = stub.received
    assert b"".join(p.data for p in parts[1:]) == blob
    stub = FlakyStore([grpc.StatusCode.INTERNAL, grpc.StatusCode.PERMISSION_DENIED])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        _upload(stub, blob)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and stub.received == []
