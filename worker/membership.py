"""The worker's side of the coordinator API: join, heartbeat, watch, tickets, step reports.

Calls that are safe to repeat (commit, release, report, heartbeat) are retried while the
coordinator is unreachable, so a coordinator restart costs the workers nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import grpc

from gptjt_core.wire_checks import MAX_DETAIL_CHARS, MAX_DHT_MADDRS, escaped
from gptjt_proto import coordinator_pb2 as pb
from gptjt_proto import coordinator_pb2_grpc as pb_grpc

from .heartbeat_stream import HeartbeatStream

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_CHECKS_PER_BEAT = 64  # a coordinator asks for verify.max_pending at most; more is not taken

# The session metadata of every call after Join (the coordinator checks it: coordinator/sessions.py).
SESSION_WORKER, SESSION_SECRET = "gptjt-worker", "gptjt-session"

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN)
# A join the coordinator will never take as it is: a bad token, a finished run, or a field it
# refuses (coordinator/validation.py: a name too long, a bad address); the worker stops and says why.
JOIN_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def session_ended(error: BaseException) -> bool:
    """The coordinator refused a call because this worker's session is over (it was declared
    dead after missed heartbeats, or the operator ended its sessions). Any call after Join may
    be the first to hear it; the answer is always the same: stop this membership and join again
    (worker/cli.py), never exit with an error."""
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAUTHENTICATED


class JoinRefused(RuntimeError):
    """The coordinator refused the join (bad token, finished run)."""


class CoordinatorClient:
    """The worker's calls to the coordinator; calls safe to repeat are retried while it is unreachable."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 retry_for_s: float = 120.0):
        """address: host:port, or several comma-separated: an active coordinator and its standbys
        (coordinator.ledger_url). A call that finds one unreachable, or standing by (UNAVAILABLE),
        moves on to the next; the one that answers is kept."""
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError(f"no coordinator address in {address!r}; give HOST:PORT[,HOST:PORT...]")
        # A restarted coordinator must hear from us within its heartbeat timeout: cap gRPC's
        # reconnect backoff (default: up to 120 s, growing 1.6x from 1 s) at 1 s.
        options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        self.channels = [grpc.aio.secure_channel(a, credentials, options=options) if credentials is not None
                         else grpc.aio.insecure_channel(a, options=options) for a in self.addresses]
        self.retry_for_s = retry_for_s
        self.metadata: tuple = ()  # this worker's session, once joined (coordinator/sessions.py)
        self.heartbeats = HeartbeatStream()
        self._use(0)

    def _use(self, index: int) -> None:
        self.current, self.address = index, self.addresses[index]
        self.channel = self.channels[index]
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def _move_on(self, error: grpc.aio.AioRpcError, failed: str) -> None:
        """After a transient failure of a call to `failed`: with more than one address, the next
        one is tried (the active coordinator may have died and a standby taken over). Calls that
        fail together move on once: only a failure at the current address moves it."""
        if len(self.addresses) > 1 and failed == self.address:
            before = self.address
            self._use((self.current + 1) % len(self.addresses))
            log.info("coordinator %s: %s; trying %s", before, error.code().name, self.address)

    async def _retry(self, method: str, request, timeout: float = 10.0):
        """Call the coordinator's `method` (by name: the stub moves with the address), retrying
        transient failures for up to retry_for_s seconds."""
        return await self._retrying(
            lambda: getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata), method,
            logging.DEBUG)

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str, level: int = logging.INFO,
                        retryable: tuple[grpc.StatusCode, ...] = RETRYABLE) -> T:
        """`call()` (which must use self.stub afresh each time: it moves with the address) until
        it succeeds, retrying transient failures (`retryable`) for up to retry_for_s seconds: an
        unreachable coordinator, or a standby answering UNAVAILABLE, moves the client on to the
        next address. Each retry is logged at `level`: routine calls at DEBUG, checkpoint
        transfers at INFO."""
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            used = self.address
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                if e.code() not in retryable or time.monotonic() > deadline:
                    raise
                log.log(level, "%s at coordinator %s failed (%s); trying again in %.1fs", what, used, e.code().name,
                        delay)
                self._move_on(e, used)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _put_retrying(self, chunks: Callable[[], Iterator[pb.CheckpointChunk]]) -> str:
        """One PutCheckpoint stream, sent whole again while the coordinator is unreachable (for up
        to retry_for_s): a coordinator restarting mid-upload refuses the connection (the chaos soak
        saw a worker exit 1 on this). A half-sent attempt leaves nothing in the store: it keeps a
        stage's file only once it is complete and hashes to its header. Returns the stored path.

        INTERNAL is retried here too: a stream the coordinator ended while chunks were still going
        out (its refusal of a stage a rollback moved, or a broken transport) fails on the client's
        send as INTERNAL ("Failed execute_batch"), not with the coordinator's status, and the chaos
        soak saw a writer exit 1 on it. Sent again, the header alone meets the refusal, which then
        arrives as itself (PERMISSION_DENIED: the step follower carries on)."""
        async def put() -> str:
            return (await self.stub.PutCheckpoint(chunks(), timeout=600, metadata=self.metadata)).path
        return await self._retrying(put, "checkpoint upload", retryable=RETRYABLE + (grpc.StatusCode.INTERNAL,))

    async def join(self, token: str, name: str, address: str, device: dict, public_key_pem: str = "",
                   dht_public_key: bytes = b"") -> pb.JoinReply:
        """Join the run; every later call carries the session the reply holds. public_key_pem: of
        the stage-link key; dht_public_key: of the averaging DHT key (OpenSSH)."""
        request = pb.JoinRequest(token=token, name=name, address=address, device=pb.DeviceInfo(**device),
                                 public_key_pem=public_key_pem, dht_public_key=dht_public_key)
        try:
            # each failed try at INFO, unlike routine calls: a volunteer starting a worker against a
            # wrong or closed address should see why nothing happens, not wait in silence
            reply = await self._retrying(lambda: self.stub.Join(request, timeout=10.0, metadata=self.metadata),
                                         "join", logging.INFO)
            self.metadata = ((SESSION_WORKER, reply.worker_id), (SESSION_SECRET, reply.session))
            return reply
        except grpc.aio.AioRpcError as e:
            if e.code() in JOIN_REFUSALS:
                raise JoinRefused(f"coordinator {self.address} refused the join: {e.details()}") from None
            if e.code() in RETRYABLE:
                raise RuntimeError(f"could not join: no coordinator at {','.join(self.addresses)} answered for "
                                   f"{self.retry_for_s:.0f} s (last: {e.code().name}); check the --join HOST:PORT "
                                   "and that the coordinator listens there and is reachable from here") from None
            raise

    async def heartbeat(self, worker_id: str, state: int, metrics: dict, loaded_epoch: int,
                        position: int = -1, device: dict | None = None, links: list[dict] | None = None,
                        rtt_ms: float = 0.0, dht_maddrs: list[str] | None = None) -> tuple[bool, list[pb.SpotCheck]]:
        """Liveness + metrics; `device` when re-measured, `links` measured since the last one,
        `dht_maddrs` of this worker's averager (others bootstrap from it). Returns (known, the
        spot checks the coordinator asks of us)."""
        request = pb.HeartbeatRequest(
            worker_id=worker_id, state=state, metrics=pb.WorkerMetrics(**metrics), loaded_epoch=loaded_epoch,
            position=position, device=pb.DeviceInfo(**device) if device else None,
            links=[pb.LinkMeasurement(**m) for m in links or []], coordinator_rtt_ms=rtt_ms,
            dht_maddrs=(dht_maddrs or [])[:MAX_DHT_MADDRS])
        # On the stream this worker holds open (worker/heartbeat_stream.py), opened afresh on the
        # address the client uses now: after a failover, at the standby that took over.
        reply = await self._retrying(lambda: self.heartbeats.beat(self.stub, self.metadata, request, timeout_s=5.0),
                                     "Heartbeat", logging.DEBUG)
        return reply.known, list(reply.checks)[:MAX_CHECKS_PER_BEAT]

    async def report_check(self, worker_id: str, check_id: int, commitment: bytes, unable: str) -> str:
        """Our answer to a spot check; returns the coordinator's verdict."""
        reply = await self._retry("ReportCheck", pb.CheckReport(worker_id=worker_id, check_id=check_id,
                                                                        commitment=commitment, unable=unable))
        return reply.verdict

    async def put_checkpoint(self, worker_id: str, step: int, spec, blob: bytes, chunk_bytes: int,
                             progress: Callable[[int], None] | None = None) -> str:
        """Stream one stage's checkpoint blob to the coordinator's store; `progress(bytes_sent)`
        after each chunk leaves."""
        header = pb.CheckpointHeader(worker_id=worker_id, step=step, start_layer=spec.start, end_layer=spec.end,
                                     embed=spec.embed, head=spec.head, nbytes=len(blob),
                                     sha256=hashlib.sha256(blob).hexdigest())

        def chunks():
            yield pb.CheckpointChunk(header=header)
            for i in range(0, len(blob), chunk_bytes):
                yield pb.CheckpointChunk(data=blob[i:i + chunk_bytes])
                if progress is not None:
                    progress(min(i + chunk_bytes, len(blob)))

        return await self._put_retrying(chunks)

    async def record_checkpoint(self, worker_id: str, step: int, spec, stored_at: str, nbytes: int,
                                sha256: str) -> str:
        """Tell the coordinator about a stage file this worker wrote into the shared store itself
        (worker/store_writer.py): the header only, no data."""
        header = pb.CheckpointHeader(worker_id=worker_id, step=step, start_layer=spec.start, end_layer=spec.end,
                                     embed=spec.embed, head=spec.head, nbytes=nbytes, sha256=sha256,
                                     stored_at=stored_at)

        def chunks():
            yield pb.CheckpointChunk(header=header)

        return await self._put_retrying(chunks)

    async def get_checkpoint(self, step: int, spec) -> bytes:
        """The safetensors blob of a layer range at `step`, re-sliced by the coordinator's store;
        fetched whole again while the coordinator is unreachable, from the next address when the
        active one died and a standby took over (a half-received blob is dropped)."""
        request = pb.GetCheckpointRequest(step=step, start_layer=spec.start, end_layer=spec.end,
                                          embed=spec.embed, head=spec.head)

        async def fetch() -> bytes:
            parts = []
            async for chunk in self.stub.GetCheckpoint(request, timeout=600, metadata=self.metadata):
                if chunk.WhichOneof("part") == "data":
                    parts.append(chunk.data)
            return b"".join(parts)
        return await self._retrying(fetch, "checkpoint download")

    async def watch(self, worker_id: str) -> AsyncIterator[pb.RunState]:
        """RunState messages, reconnecting for as long as it takes (coordinator restarts)."""
        delay = 0.2
        while True:
            used = self.address
            try:
                async for state in self.stub.Watch(pb.WatchRequest(worker_id=worker_id), metadata=self.metadata):
                    delay = 0.2
                    yield state
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return  # our session ended: the heartbeat loop learns it too and stops the worker
                if e.code() not in RETRYABLE:
                    raise
                self._move_on(e, used)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def lease(self, worker_id: str, n: int) -> pb.LeaseReply:
        return await self._retry("LeaseTickets", pb.LeaseRequest(worker_id=worker_id, max_tickets=n))

    async def commit(self, worker_id: str, ticket: pb.Ticket, loss: float, tokens: int) -> int:
        reply = await self._retry("CommitTicket", pb.CommitRequest(
            worker_id=worker_id, ticket_id=ticket.ticket_id, attempt=ticket.attempt, loss=loss, tokens=tokens))
        return reply.result

    async def release(self, worker_id: str, ticket_ids: list[int], reason: str = "") -> int:
        """Hand leases back; `reason` says what failed when this worker's own work did (the
        operator sees it in the coordinator's events), cut to what the coordinator accepts."""
        if not ticket_ids:
            return 0
        # one printable line: the coordinator refuses anything else (an exception's text may hold newlines)
        reason = escaped(reason)[:MAX_DETAIL_CHARS]
        reply = await self._retry("ReleaseTickets", pb.ReleaseRequest(worker_id=worker_id, ticket_ids=ticket_ids,
                                                                      reason=reason))
        return reply.released

    async def report(self, worker_id: str, step: int, attempt: int, kind: int, grad_norm_sq: float = 0.0,
                     micro_batches: int = 0, group_weight: float = 0.0, state_digest: str = "",
                     detail: str = "", commitments: list | None = None) -> bool:
        """kind: pb.CONTRIBUTION, pb.AVERAGED, pb.APPLIED or pb.AVERAGING_FAILED (see coordinator.proto);
        commitments: with a CONTRIBUTION, one MicroBatchCommitment per micro-batch of the attempt."""
        reply = await self._retry("ReportStep", pb.StepReport(
            worker_id=worker_id, step=step, attempt=attempt, kind=kind, grad_norm_sq=grad_norm_sq,
            micro_batches=micro_batches, group_weight=group_weight, state_digest=state_digest,
            detail=detail[:MAX_DETAIL_CHARS], commitments=commitments or []))
        return reply.accepted

    async def report_peer_failure(self, worker_id: str, address: str, reason: str) -> bool:
        """Tell the coordinator a peer failed; True if it was declared dead."""
        try:
            reply = await self.stub.ReportPeerFailure(pb.PeerFailure(worker_id=worker_id, address=address,
                                                                     reason=reason[:MAX_DETAIL_CHARS]),
                                                 timeout=5.0, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            log.warning("could not report peer %s (%s)", address, e.code().name)
            return False
        return reply.declared_dead

    async def leave(self, worker_id: str) -> None:
        await self.stub.Leave(pb.LeaveRequest(worker_id=worker_id), timeout=5.0, metadata=self.metadata)

    async def close(self) -> None:
        self.heartbeats.close()
        for channel in self.channels:
            await channel.close()
