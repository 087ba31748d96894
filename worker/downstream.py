"""Sending a stage's output down the pipeline: the replica, the link's codecs, the call, failure reports."""

from __future__ import annotations

import asyncio
import time

import grpc
import torch

from gptjt_core.compression import Encoded, encode
from gptjt_proto import stage_pb2 as pb

from .link_codecs import LinkCodecChooser
from .membership import CoordinatorClient
from .routing import NextStageRouter
from .transport import StageClient

# Downstream errors that say something about the request, not about the peer's health.
_NOT_THE_PEERS_FAULT = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)


class DownstreamSender:
    """Sends one micro-batch to the best replica of the next stage and returns its answer.

    The router picks the replica and learns its round-trip times; the codec chooser picks the
    link's codecs and learns its throughput; a replica whose connection fails is skipped from
    then on and reported to the coordinator (as `worker_id`), which probes it.
    """

    def __init__(self, router: NextStageRouter, link_codecs: LinkCodecChooser, client: StageClient,
                 coordinator: CoordinatorClient, worker_id: str):
        self.router = router
        self.link_codecs = link_codecs
        self.client = client
        self.coordinator = coordinator
        self.worker_id = worker_id

    @property
    def available(self) -> bool:
        """Some replica of the next stage is worth a try."""
        return self.router.available

    async def send(self, header: pb.MicroBatchHeader,
                   out: torch.Tensor) -> tuple[pb.ReplyHeader, Encoded | None, Encoded]:
        """Encode a stage output (B, T, D) with the codecs of the link it takes and send it;
        return (reply header, encoded input gradient, the encoded output as sent: the stage commits
        to its digest). Raises NoReplicaAvailable when no replica is live, and the call's
        grpc.aio.AioRpcError when it fails."""
        address = self.router.pick()
        act_codec, grad_codec = self.link_codecs.codecs(address)
        header.gradient_codec = grad_codec
        started = time.monotonic()
        try:
            activations = encode(out, act_codec)
            reply, grad = await self.client.process(address, header, activations,
                                                    timeout=self.router.deadline_s(address))
        except grpc.aio.AioRpcError as e:
            blamed = e.code() not in _NOT_THE_PEERS_FAULT
            self.router.done(address, started, ok=not blamed)
            if blamed:
                asyncio.get_running_loop().create_task(self.coordinator.report_peer_failure(
                    self.worker_id, address, f"{e.code().name}: {e.details()}"))
            raise
        except BaseException:  # not the peer's doing (a bad tensor, a cancelled task): just not in flight
            self.router.release(address)
            raise
        self.router.done(address, started, ok=True)
        nbytes = len(activations.data) + (len(grad.data) if grad is not None else 0)
        self.link_codecs.observe(address, nbytes, time.monotonic() - started - reply.compute_s)
        return reply, grad, activations
