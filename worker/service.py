"""The Stage gRPC servicer: receive a micro-batch, run this stage, pass it on, return its gradient."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import grpc

from gptjt_core.compression import decode, encode
from gptjt_proto import stage_pb2 as pb
from gptjt_proto import stage_pb2_grpc as pb_grpc

from .compute import BACKWARD, FORWARD, OTHER
from .routing import NoReplicaAvailable
from .stage import StaleMicroBatch
from .transport import RejectedMicroBatch, gradient_reply, read_micro_batch
from .wire import data_chunks

if TYPE_CHECKING:
    from .runner import WorkerRunner

log = logging.getLogger(__name__)

# Downstream failures the caller should see as they are; anything else becomes ABORTED ("a stage
# beyond you failed"), so the caller does not blame this worker for it.
_PASS_THROUGH = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.RESOURCE_EXHAUSTED)


class StageService(pb_grpc.StageServicer):
    def __init__(self, worker: WorkerRunner):
        self.worker = worker

    async def Probe(self, request, context):
        """A link measurement (worker/link_probe.py): the payload is only counted."""
        if len(request.payload) > 4 << 20:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"probe payload of {len(request.payload)} bytes; a probe carries at most 4 MiB")
        return pb.ProbeReply(received_bytes=len(request.payload))

    async def Process(self, request_iterator, context):
        w = self.worker
        stage = w.stage
        if stage is None or w.assignment is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no stage yet")
        if stage.spec.embed:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this worker holds stage 0, which reads tokens itself and takes no activations")
        pipeline = w.run.pipeline
        try:
            inc = await read_micro_batch(request_iterator, w.assignment.stage, stage.model.config.n_embd,
                                         pipeline.max_payload_bytes, w.counters)
        except RejectedMicroBatch as e:
            log.warning("refused a micro-batch from %s: %s", context.peer(), e)
            await context.abort(e.code, str(e))
        h = inc.header
        key = (h.ticket_id, h.attempt)
        started = time.perf_counter()  # compute_s in the reply: the caller tells link time from ours
        grad_codec = h.gradient_codec or pipeline.gradient_codec  # the caller picks it for its link
        try:
            if stage.spec.head:
                loss, targets, grad = await w.compute.run(FORWARD, lambda: stage.forward_backward(
                    key, h.step, inc.activations, inc.prefix_lengths, inc.labels, h.global_batch))
                grad_enc = encode(grad, grad_codec)
                for chunk in gradient_reply(loss, targets, grad_enc, pipeline.chunk_bytes, w.counters,
                                            time.perf_counter() - started):
                    yield chunk
                return
            out = await w.compute.run(FORWARD, lambda: stage.forward(key, h.step, inc.activations, inc.prefix_lengths))
            down = pb.MicroBatchHeader()
            down.CopyFrom(h)
            down.stage = h.stage + 1
            try:
                reply, grad_enc = await w.send_downstream(down, out)
            except (grpc.aio.AioRpcError, NoReplicaAvailable) as e:
                await w.compute.run(OTHER, lambda: stage.discard(key))
                if isinstance(e, NoReplicaAvailable):
                    await context.abort(grpc.StatusCode.ABORTED, f"stage {h.stage + 1}: {e}")
                code = e.code() if e.code() in _PASS_THROUGH else grpc.StatusCode.ABORTED
                await context.abort(code, f"stage {h.stage + 1}: {e.details()}")
            grad_in = await w.compute.run(BACKWARD, lambda: stage.backward(key, h.step, decode(grad_enc)))
            grad_enc = encode(grad_in, grad_codec)
            for chunk in gradient_reply(reply.loss, reply.target_tokens, grad_enc, pipeline.chunk_bytes, w.counters,
                                        time.perf_counter() - started):
                yield chunk
        except StaleMicroBatch as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def FetchState(self, request, context):
        """Weights + optimizer state and how many steps they hold, taken on the compute thread so
        no optimizer step lands halfway through."""
        w = self.worker
        stage = w.stage
        if stage is None or w.loaded_epoch < 0:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no stage")
        blob, position = await w.compute.run(OTHER, lambda: (stage.checkpoint_blob(), stage.position))
        spec = stage.spec
        yield pb.StageChunk(state=pb.StateHeader(nbytes=len(blob), position=position, stage=w.assignment.stage,
                                                 start_layer=spec.start, end_layer=spec.end))
        for chunk in data_chunks(blob, w.run.pipeline.chunk_bytes):
            yield chunk
