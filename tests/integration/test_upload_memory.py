"""A stage file streamed to the coordinator is never held whole in its memory.

`Upload.receive` (coordinator/checkpoint_store.py) asks gRPC for the next chunk only once the last
is written, so what waits in between is what HTTP/2 flow control lets the sender have in flight
(the stream's window), not the file. A GPT-J 6B stage file is gigabytes; a coordinator that held
each upload whole would run out of memory when several stages checkpoint at once.

Here a 512 MiB file goes through a gRPC server built as the coordinator's (`coordinator.cli`'s
options), into the real `Upload` on a store whose disk is made slower than loopback (~200 MiB/s),
so the sender outpaces the writer the whole time. The receiving process's peak memory may grow by
a quarter of the file at most. Measured 2026-12-07 by hand with a plain gRPC server and the same
kind of writer: 200 and 800 MiB files each raised the peak by ~22 MiB; four 150 MiB uploads at
once by ~57 MiB.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import struct
import time
from pathlib import Path

FILE_MIB = 512
CHUNK = 1 << 20  # pipeline.chunk_bytes' default: what a worker sends in each message
WRITE_S_PER_MIB = 0.005  # a disk of ~200 MiB/s: slower than loopback, so chunks arrive faster than they are written
GROWTH_BOUND = (FILE_MIB << 20) // 4


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _file_parts():
    """A valid safetensors file of one float32 tensor of FILE_MIB MiB of zeros, in CHUNK pieces,
    made as they are sent (the test's own memory stays small too)."""
    values = FILE_MIB << 20
    header = json.dumps({"w": {"dtype": "F32", "shape": [values // 4], "data_offsets": [0, values]}}).encode()
    header += b" " * (-len(header) % 8)
    yield struct.pack("<Q", len(header)) + header
    zeros = bytes(CHUNK)
    for _ in range(FILE_MIB):
        yield zeros


def _serve(root: str, ports, results) -> None:
    """The receiving side, in a process of its own so that its peak memory is the upload's."""
    import asyncio

    import grpc
    from gptjt_proto import coordinator_pb2 as pb

    from coordinator import validation
    from coordinator.checkpoint_store import CheckpointStore, Upload
    from coordinator.cli import _grpc_server
    from gptjt_core.stage_spec import StageSpec

    class SlowDisk(Upload):
        def write(self, chunk: bytes) -> None:
            time.sleep(WRITE_S_PER_MIB * len(chunk) / 2**20)
            super().write(chunk)

    async def put(request_iterator, context):
        header = (await anext(aiter(request_iterator))).header
        upload = SlowDisk(CheckpointStore(root), header.step, StageSpec(0, 1, embed=True), header.nbytes,
                          header.sha256)
        before = _peak_bytes()
        try:
            path = await upload.receive(validation.checkpoint_data(request_iterator))
        finally:
            upload.discard()
        results.put((before, _peak_bytes(), path))
        return pb.CheckpointReply(path=path)

    async def main() -> None:
        server = _grpc_server([])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("gptjt.Coordinator", {
            "PutCheckpoint": grpc.stream_unary_rpc_method_handler(
                put, request_deserializer=pb.CheckpointChunk.FromString,
                response_serializer=pb.CheckpointReply.SerializeToString)})])
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def test_an_upload_waits_in_flow_control_not_in_the_coordinators_memory(tmp_path):
    import grpc
    from gptjt_proto import coordinator_pb2 as pb
    from gptjt_proto import coordinator_pb2_grpc as pb_grpc

    digest, nbytes = hashlib.sha256(), 0
    for part in _file_parts():
        digest.update(part)
        nbytes += len(part)
    ctx = multiprocessing.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=_serve, args=(str(tmp_path / "store"), ports, results), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        header = pb.CheckpointHeader(worker_id="w", step=1, start_layer=0, end_layer=1, embed=True, nbytes=nbytes,
                                     sha256=digest.hexdigest())
        messages = itertools.chain([pb.CheckpointChunk(header=header)],  # made as sent, as a worker does
                                   (pb.CheckpointChunk(data=p) for p in _file_parts()))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            started = time.monotonic()
            reply = pb_grpc.CoordinatorStub(channel).PutCheckpoint(messages, timeout=120)
            seconds = time.monotonic() - started
        before, after, path = results.get(timeout=30)
    finally:
        server.kill()
        server.join(10)
    assert reply.path == path and Path(path).stat().st_size == nbytes
    # the writer set the pace: had it not, the sender never outran it and nothing was shown
    assert seconds >= 0.8 * FILE_MIB * WRITE_S_PER_MIB, f"{FILE_MIB} MiB went through in {seconds:.1f} s"
    grown = after - before
    print(f"{FILE_MIB} MiB in {seconds:.1f} s; the receiver's peak memory grew by {grown / 2**20:.1f} MiB")
    assert grown < GROWTH_BOUND, (f"receiving a {FILE_MIB} MiB file raised the peak memory by {grown / 2**20:.0f} MiB: "
                                  "chunks are held beyond gRPC's flow-control window")
