"""gRPC stage-to-stage streaming: chunked tensors down the pipeline, gradients back up."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc

from gptjt_core.compression import Encoded
from gptjt_core.config import LinkConfig
from gptjt_core.wire_checks import INVALID_ARGUMENT, RESOURCE_EXHAUSTED, Refused
from gptjt_proto import stage_pb2 as pb
from gptjt_proto import stage_pb2_grpc as pb_grpc

from .link_shaper import LinkShaper
from .micro_batch_validation import Incoming, StageLimits, check_header, check_payload
from .stage_tls import target_name
from .wire import data_chunks, encoded_from, meta_pb

log = logging.getLogger(__name__)

GRPC_OPTIONS = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.keepalive_time_ms", 10_000), ("grpc.http2.max_pings_without_data", 0),
                ("grpc.max_concurrent_streams", 64)]  # per connection: a peer cannot open calls without end


class LinkCounters:
    """Bytes that crossed this worker's stage links (payload, both directions)."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


async def read_micro_batch(request_iterator, limits: StageLimits, counters: LinkCounters) -> Incoming:
    """Assemble a streamed micro-batch, checking its header before taking any of its bytes
    (worker/micro_batch_validation.py); raise Refused on bad input."""
    header, payload = await _receive(request_iterator, limits)
    counters.received += len(payload)
    return check_payload(header, payload, limits)


async def _receive(request_iterator, limits: StageLimits) -> tuple[pb.MicroBatchHeader, bytes]:
    """The header and the activations' bytes, refusing a stream that does not follow its header."""
    header, parts, size = None, [], 0
    async for chunk in request_iterator:
        kind = chunk.WhichOneof("part")
        if header is None:
            if kind != "header":
                raise Refused(INVALID_ARGUMENT, "micro_batch", kind, "a header as the first chunk")
            check_header(chunk.header, limits)
            header = chunk.header
            continue
        if kind != "data":
            raise Refused(INVALID_ARGUMENT, "micro_batch", kind, "only data chunks after the header")
        size += len(chunk.data)
        if size > header.activations.nbytes:
            raise Refused(RESOURCE_EXHAUSTED, "micro_batch.activations", f"{size} bytes",
                          f"the {header.activations.nbytes} bytes the header announced", show=f"{size} bytes")
        parts.append(chunk.data)
    if header is None:
        raise Refused(INVALID_ARGUMENT, "micro_batch", None, "a header: the request was empty")
    return header, b"".join(parts)


def gradient_reply(loss: float, targets: int, grad: Encoded | None, chunk_bytes: int, counters: LinkCounters,
                   compute_s: float = 0.0):
    meta = meta_pb(grad) if grad is not None else pb.TensorMeta()
    yield pb.StageChunk(reply=pb.ReplyHeader(loss=loss, target_tokens=targets, gradient=meta, compute_s=compute_s))
    if grad is not None:
        counters.sent += len(grad.data)
        yield from data_chunks(grad.data, chunk_bytes)


class StageClient:
    """Long-lived channels to downstream stages (a new channel's first transfer is slow).

    link: with link emulation on (link.emulate_mbit / emulate_latency_ms), every downstream
    link gets a LinkShaper per direction, and micro-batches and their gradients move at the
    emulated speed."""

    def __init__(self, counters: LinkCounters, chunk_bytes: int, credentials: grpc.ChannelCredentials | None = None,
                 link: LinkConfig | None = None):
        self.counters = counters
        self.chunk_bytes = chunk_bytes
        self.credentials = credentials  # mutual TLS (worker/stage_tls.py); None: plaintext links
        self.link = link
        # address -> the worker id the coordinator says serves it: with TLS, the server must
        # present that worker's certificate (RunState's next_ids, peer_address_ids, measure_link_ids)
        self.identities: dict[str, str] = {}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._shapers: dict[str, tuple[LinkShaper, LinkShaper]] = {}  # address -> (to it, from it)

    def shapers(self, address: str) -> tuple[LinkShaper, LinkShaper] | None:
        if self.link is None or not self.link.shaped:
            return None
        if address not in self._shapers:
            self._shapers[address] = (LinkShaper(self.link.emulate_mbit, self.link.emulate_latency_ms),
                                      LinkShaper(self.link.emulate_mbit, self.link.emulate_latency_ms))
        return self._shapers[address]

    def learn(self, addresses, worker_ids) -> None:
        """Who serves which address (parallel lists from the RunState)."""
        self.identities.update(zip(addresses, worker_ids))

    def _stub(self, address: str) -> pb_grpc.StageStub:
        if self.credentials is None:
            key = (address, "")
            if key not in self._channels:
                self._channels[key] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            return pb_grpc.StageStub(self._channels[key])
        worker_id = self.identities.get(address)
        if not worker_id:
            raise RuntimeError(f"no worker is known to serve {address}: a TLS stage link needs the worker id the "
                               "coordinator names for it")
        key = (address, worker_id)
        if key not in self._channels:
            options = [*GRPC_OPTIONS, ("grpc.ssl_target_name_override", target_name(worker_id))]
            self._channels[key] = grpc.aio.secure_channel(address, self.credentials, options=options)
        return pb_grpc.StageStub(self._channels[key])

    async def process(self, address: str, header: pb.MicroBatchHeader, activations: Encoded,
                      timeout: float | None = None) -> tuple[pb.ReplyHeader, Encoded | None]:
        """Send one micro-batch down; return the reply header and the encoded input gradient."""
        header.activations.CopyFrom(meta_pb(activations))
        shapers = self.shapers(address)

        async def requests():
            first = pb.StageChunk(header=header)
            if shapers is None:
                yield first
                for chunk in data_chunks(activations.data, self.chunk_bytes):
                    yield chunk
                return
            n, step = len(activations.data), self.chunk_bytes
            arrivals = shapers[0].schedule([first.ByteSize()] + [min(step, n - i) for i in range(0, n, step)])
            for arrival, chunk in zip(arrivals, itertools.chain([first], data_chunks(activations.data, step))):
                await LinkShaper.until(arrival)  # the receiver gets each piece when the link delivers it
                yield chunk

        call = self._stub(address).Process(requests(), timeout=timeout)
        self.counters.sent += len(activations.data)
        reply, parts, reply_bytes, reply_started = None, [], 0, None
        async for chunk in call:
            if reply_started is None:
                reply_started = asyncio.get_running_loop().time()
            reply_bytes += chunk.ByteSize()
            if chunk.WhichOneof("part") == "reply":
                reply = chunk.reply
            elif chunk.WhichOneof("part") == "data":
                parts.append(chunk.data)
        if reply is None:
            raise RuntimeError(f"stage at {address} ended the call without a reply header")
        if shapers is not None:  # the reply left the other end when its first piece did
            await LinkShaper.until(shapers[1].schedule([reply_bytes], start=reply_started)[0])
        data = b"".join(parts)
        self.counters.received += len(data)
        grad = encoded_from(reply.gradient, data) if reply.gradient.codec else None
        return reply, grad

    async def probe(self, address: str, payload_bytes: int) -> tuple[float, float]:
        """(seconds of an empty round trip, seconds of a round trip carrying `payload_bytes`) to
        the stage server at `address`, through the link emulation when it is on."""
        stub, shapers = self._stub(address), self.shapers(address)
        times = []
        for size in (0, payload_bytes):
            # Not loop.time(): uvloop's is cached once per loop iteration, so a fast call can
            # measure 0 s (seen: a division by zero in the prober).
            started = time.perf_counter()
            if shapers is not None:
                await LinkShaper.until(shapers[0].schedule([size + 8])[0])
            await stub.Probe(pb.ProbeRequest(payload=bytes(size)), timeout=30)
            if shapers is not None:
                await LinkShaper.until(shapers[1].schedule([8])[0])
            times.append(time.perf_counter() - started)
        return times[0], times[1]

    async def fetch_evidence(self, address: str, ticket_id: int, attempt: int, timeout: float = 60) -> pb.EvidenceReply:
        """The evidence of one micro-batch from the stage server at `address` (a spot check)."""
        reply = await self._stub(address).FetchEvidence(pb.EvidenceRequest(ticket_id=ticket_id, attempt=attempt),
                                                        timeout=timeout)
        self.counters.received += reply.ByteSize()
        return reply

    async def fetch_state(self, address: str, timeout: float | None = 600) -> tuple[pb.StateHeader, bytes]:
        """The stage state (weights + optimizer, safetensors) held by the worker at `address`."""
        header, parts = None, []
        async for chunk in self._stub(address).FetchState(pb.FetchStateRequest(), timeout=timeout):
            if chunk.WhichOneof("part") == "state":
                header = chunk.state
            elif chunk.WhichOneof("part") == "data":
                parts.append(chunk.data)
        blob = b"".join(parts)
        if header is None or len(blob) != header.nbytes:
            raise RuntimeError(f"stage state from {address} is truncated: {len(blob)} bytes of "
                               f"{header.nbytes if header else 'an unannounced size'}")
        self.counters.received += len(blob)
        return header, blob

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


