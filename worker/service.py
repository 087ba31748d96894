"""The Stage gRPC servicer: receive a micro-batch, run this stage, pass it on, return its gradient."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from gptjt_core.compression import decode, encode
from gptjt_proto import stage_pb2 as pb
from gptjt_proto import stage_pb2_grpc as pb_grpc

from .compute import BACKWARD, FORWARD, OTHER
from .stage import StaleMicroBatch
from .transport import RejectedMicroBatch, gradient_reply, read_micro_batch, state_bytes
from .wire import data_chunks

if TYPE_CHECKING:
    from .runner import WorkerRunner

log = logging.getLogger(__name__)

# Downstream failures the caller should see as they are; anything else means "next stage unreachable".
_PASS_THROUGH = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.RESOURCE_EXHAUSTED)


class StageService(pb_grpc.StageServicer):
    def __init__(self, worker: WorkerRunner):
        self.worker = worker

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
        try:
            if stage.spec.head:
                loss, targets, grad = await w.compute.run(FORWARD, lambda: stage.forward_backward(
                    key, h.step, inc.activations, inc.prefix_lengths, inc.labels, h.global_batch))
                grad_enc = encode(grad, pipeline.gradient_codec)
                for chunk in gradient_reply(loss, targets, grad_enc, pipeline.chunk_bytes, w.counters):
                    yield chunk
                return
            out = await w.compute.run(FORWARD, lambda: stage.forward(key, h.step, inc.activations, inc.prefix_lengths))
            down = pb.MicroBatchHeader()
            down.CopyFrom(h)
            down.stage = h.stage + 1
            try:
                reply, grad_enc = await w.client.process(w.assignment.next_address, down,
                                                         encode(out, pipeline.activation_codec))
            except grpc.aio.AioRpcError as e:
                await w.compute.run(OTHER, lambda: stage.discard(key))
                code = e.code() if e.code() in _PASS_THROUGH else grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"stage {h.stage + 1} at {w.assignment.next_address}: {e.details()}")
            grad_in = await w.compute.run(BACKWARD, lambda: stage.backward(key, h.step, decode(grad_enc)))
            for chunk in gradient_reply(reply.loss, reply.target_tokens, encode(grad_in, pipeline.gradient_codec),
                                        pipeline.chunk_bytes, w.counters):
                yield chunk
        except StaleMicroBatch as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def FetchState(self, request, context):
        stage = self.worker.stage
        if stage is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no stage")
        blob = await self.worker.compute.run(OTHER, lambda: state_bytes(stage.model.state_dict()))
        yield pb.StageChunk(state=pb.TensorMeta(nbytes=len(blob), codec="safetensors"))
        for chunk in data_chunks(blob, self.worker.run.pipeline.chunk_bytes):
            yield chunk
