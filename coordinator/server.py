"""grpc.aio servicer: a thin adapter between protobuf messages and the ledger."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc
from safetensors.torch import save

from gptjt_proto import coordinator_pb2 as pb
from gptjt_proto import coordinator_pb2_grpc as pb_grpc

from gptjt_core.background import start_background
from gptjt_core.commitment import Commitment
from gptjt_core.stage_spec import StageSpec
from gptjt_core.wire_checks import Refused, escaped
from . import validation
from .checkpoint_store import CheckpointStore
from .dht_authority import DhtAuthority
from .heartbeats import answer_heartbeat, device_fields
from .rate_limit import RateLimiter
from .run_ca import RunCA
from .sessions import caller, no_session, not_yours
from .status_cache import StatusCache
from .watch_streams import WatchStreams

from .ledger import ALIVE_STATES, RunLedger, Submitted, standby_view

log = logging.getLogger(__name__)

_PHASES = {"waiting": pb.WAITING, "open": pb.OPEN, "accumulated": pb.ACCUMULATED,
           "averaging": pb.AVERAGING, "applying": pb.APPLYING, "done": pb.DONE}
_REPORTS = {pb.CONTRIBUTION: "contribution", pb.AVERAGED: "averaged", pb.APPLIED: "applied"}
_COMMIT = {"committed": pb.COMMITTED, "already_committed": pb.ALREADY_COMMITTED,
           "stale": pb.STALE, "not_leased": pb.NOT_LEASED}


def assignment_pb(a: dict) -> pb.StageAssignment:
    return pb.StageAssignment(stage=a["stage"], start_layer=a.get("start_layer", 0),
                              end_layer=a.get("end_layer", 0), embed=a.get("embed", False),
                              head=a.get("head", False), next_address=a["next_address"],
                              num_stages=a["num_stages"], next_addresses=a["next_addresses"],
                              member=a["member"], peer_ids=a["peer_ids"], peer_addresses=a["peer_addresses"],
                              contributors=a["contributors"], checkpoint_writer=a["checkpoint_writer"],
                              standby_reason=a.get("standby_reason", ""), next_ids=a["next_ids"],
                              peer_address_ids=a["peer_address_ids"], upstream_ids=a["upstream_ids"],
                              fetcher_ids=a["fetcher_ids"], peer_dht_ids=a["peer_dht_ids"],
                              verifier_ids=a.get("verifier_ids", []),
                              attested_digests=a["attested_digests"], attested_position=a["attested_position"])


async def address_is_down(address: str, timeout_s: float = 2.0) -> bool:
    """True if host:port refuses TCP connections (a killed process's port is closed). A probe
    that times out proves nothing (a loaded machine): the heartbeat timeout decides then."""
    host, _, port = address.rpartition(":")
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can lose a cancel (event_wait.py)
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except TimeoutError:
        return False
    except (OSError, ValueError):
        return True
    writer.close()
    return False


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """The Coordinator gRPC API: each method checks its request and makes one ledger call."""

    def __init__(self, ledger: RunLedger, store: CheckpointStore, dht_peers: list[str] | None = None,
                 ca: RunCA | None = None, dht_authority: DhtAuthority | None = None):
        """dht_peers: multiaddrs of the hivemind DHT that replicas average through (replicas > 1);
        ca: signs the stage-link certificates of joining workers; dht_authority: their DHT access
        tokens (replicas > 1)."""
        self.ledger, self.store = ledger, store
        self.dht_peers = dht_peers or []
        self.ca = ca
        self.dht_authority = dht_authority
        c = ledger.run.coordinator
        self.joins = RateLimiter(c.joins_per_s, c.join_burst)  # per join token
        self.statuses = StatusCache(ledger)  # Status, the dashboard and /metrics: built off the event loop
        self.watches = WatchStreams(lambda: ledger.version, ledger.views.standby_key)
        # Set as the coordinator shuts down: the streams it then closes itself, and workers that
        # stop with it (a whole swarm stopped at once), say nothing about whether a worker died.
        self.stopping = False
        self.limits = validation.RunLimits.of(ledger.run, ledger.plan[-1].end, ledger.shape)

    async def door(self, check, request, context) -> None:
        """Validate `request` with `check` (coordinator/validation.py) or end the call with the status
        the refusal names; a refused request writes nothing."""
        try:
            check(request, self.limits)
        except Refused as e:
            log.info("refused a request from %s: %s", context.peer(), e)
            await context.abort(grpc.StatusCode[e.code], str(e))

    async def notify(self) -> None:
        await self.watches.notify()

    async def Join(self, request, context):
        token_id = self.ledger.tokens.admitting(request.token)
        if token_id is None:
            # Nothing is recorded for a refused join, and the token is never logged.
            log.warning("refused a join from %s (%s): bad or missing run token", request.name, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "bad or missing run token; ask the operator for one (gptjt token create)")
        if not self.joins.allow(token_id):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many joins with this token (coordinator.joins_per_s = "
                                f"{self.ledger.run.coordinator.joins_per_s}); try again in a few seconds")
        # After the token: a caller without one learns nothing, not even which fields are wrong.
        await self.door(validation.check_join, request, context)
        if request.worker_id and self.ledger.worker(request.worker_id) is not None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"worker id {request.worker_id!r} is taken; join without a worker id (a worker keeps "
                                "its session across coordinator restarts and never joins twice)")
        if self.ledger.phase == "done":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the run is finished")
        quarantined = self.ledger.workers.quarantined_as(request.name, token_id)
        if quarantined:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{request.name!r} is quarantined (worker {quarantined}: spot checks found its work "
                                "wrong; `gptjt events --kind verification` says why); ask the operator")
        await self._refuse_missing_keys(request, context)
        row = self.ledger.join(request.name, request.address, device_fields(request.device), token_id)
        cert, dht_token = await self._credentials(row["id"], request, context)
        await self.notify()
        log.info("worker %s (%s) joined at %s: %s", row["id"], request.name, request.address,
                 f"stage {row['stage']}" if row["stage"] >= 0 else "standby")
        return pb.JoinReply(worker_id=row["id"], run_config_json=json.dumps(self.ledger.run.to_dict()),
                            assignment=assignment_pb(self.ledger.assignment(row["id"])),
                            heartbeat_interval_s=self.ledger.run.coordinator.heartbeat_interval_s,
                            dht_peers=self.run_dht_peers(row["id"]), session=row["session"],
                            ca_pem=self.ca.cert_pem.decode() if self.ca is not None else "", cert_pem=cert.decode(),
                            dht_token=dht_token,
                            dht_authority_key=self.dht_authority.public_key if self.dht_authority else b"")

    async def _refuse_missing_keys(self, request, context) -> None:
        """Links that are mutual TLS need the worker's link key; a run with replicas its DHT key."""
        if self.ca is not None and self.ledger.run.link.tls == "on" and not request.public_key_pem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "public_key_pem is empty: this run's stage links "
                                "are mutual TLS; the worker sends the public half of its link key (a newer "
                                "gptjt-worker does)")
        if self.dht_authority is not None and not request.dht_public_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "dht_public_key is empty: this run's replicas "
                                "average through a DHT that serves only run members; the worker sends the public "
                                "half of its averaging key (a newer gptjt-worker does)")

    async def _credentials(self, worker_id: str, request, context) -> tuple[bytes, pb.DhtAccessToken]:
        """The new worker's stage-link certificate and DHT access token. A key that cannot be
        signed ends the join, and the worker row just made is dropped."""
        cert, token, field = b"", pb.DhtAccessToken(), ""
        try:
            if self.ca is not None and request.public_key_pem:
                field = "public_key_pem"
                cert = self.ca.issue(worker_id, request.public_key_pem.encode())
            if self.dht_authority is not None and request.dht_public_key:
                field = "dht_public_key"
                t = self.dht_authority.issue(worker_id, request.dht_public_key)
                token = pb.DhtAccessToken(username=t.username, public_key=t.public_key,
                                          expiration_time=t.expiration_time, signature=t.signature)
        except ValueError as e:
            with self.ledger.db.tx():
                self.ledger.recovery.drop_worker(worker_id, "left", "worker_left")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {e}")
        return cert, token

    def run_dht_peers(self, worker_id: str) -> list[str]:
        """Where a worker's averager bootstraps: the coordinator's DHT peer and live workers' peers
        (so the network stays one across coordinator restarts). Empty without replicas."""
        if not self.dht_peers:
            return []
        return self.dht_peers + self.ledger.worker_dht_peers(worker_id)

    async def Heartbeat(self, request, context):
        await self.door(validation.check_heartbeat, request, context)
        reply = answer_heartbeat(self.ledger, request)
        await self.notify()
        return reply

    async def Heartbeats(self, request_iterator, context):
        """Heartbeat's requests as messages of one stream, each answered in turn and each in the
        stream's own worker's name. The interceptor checked the session when the stream opened. A
        session ends only with its worker (declared dead, left, or ended by the operator), and the
        ledger records a beat only from a live worker: a beat it did not record ends the stream as
        the interceptor would have refused a call, without hashing the secret again."""
        worker_id = caller(context)
        async for request in request_iterator:
            if request.worker_id != worker_id:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, not_yours(request, worker_id))
            await self.door(validation.check_heartbeat, request, context)
            reply = answer_heartbeat(self.ledger, request)
            if not reply.known:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, no_session(worker_id))
            await self.notify()
            yield reply

    async def ReportCheck(self, request, context):
        await self.door(validation.check_check_report, request, context)
        recomputed = Commitment.from_bytes(request.commitment) if request.commitment else None
        verdict = self.ledger.answer_check(request.worker_id, request.check_id, recomputed, escaped(request.unable))
        await self.notify()  # a verdict may quarantine a worker and roll the run back: Watch streams show it now
        return pb.CheckReportReply(verdict=verdict)

    async def Leave(self, request, context):
        await self.door(validation.check_leave, request, context)
        self.ledger.leave(request.worker_id)
        await self.notify()
        return pb.LeaveReply()

    async def Watch(self, request, context):
        await self.door(validation.check_watch, request, context)
        try:
            async for state in self._watch(request, context):
                yield state
        finally:
            # A SIGKILLed worker's stream is reset at once: check now instead of waiting for
            # the heartbeat timeout (a worker that merely reconnects still answers on its port).
            start_background(self._probe_after_disconnect(request.worker_id), "probe after a Watch closed", log)

    async def _probe_after_disconnect(self, worker_id: str, delay_s: float = 0.2) -> None:
        await asyncio.sleep(delay_s)
        row = self.ledger.worker(worker_id) if worker_id else None
        if self.stopping or row is None or row["state"] not in ALIVE_STATES:
            return
        if await address_is_down(row["address"]) and not self.stopping:
            self.ledger.declare_dead(worker_id, f"its Watch stream closed and {row['address']} refuses connections")
            await self.notify()
            log.warning("worker %s at %s is down (its stream closed): declared dead", worker_id, row["address"])

    async def _watch(self, request, context):
        def read() -> dict:
            return {**self.ledger.run_state(request.worker_id), "dht_peers": self.run_dht_peers(request.worker_id)}

        async for state in self.watches.states(read, context.cancelled, lambda s: s["assignment"]["stage"] < 0,
                                               standby_view):
            yield pb.RunState(step=state["step"], attempt=state["attempt"], phase=_PHASES[state["phase"]],
                              global_grad_norm=state["global_grad_norm"], plan_version=state["plan_version"],
                              assignment=assignment_pb(state["assignment"]), paused=state["paused"],
                              restore_epoch=state["restore_epoch"], restore_step=state["restore_step"],
                              restore_from_store=state["restore_from_store"],
                              measure_links=[a for a, _ in state["measure_links"]],
                              measure_link_ids=[i for _, i in state["measure_links"]], drain=state["drain"],
                              loss_scale=state["loss_scale"], newest_check=state["newest_check"],
                              dht_peers=state["dht_peers"])

    async def LeaseTickets(self, request, context):
        await self.door(validation.check_lease, request, context)
        rows, reason = self.ledger.lease(request.worker_id, request.max_tickets)
        await self.notify()
        return pb.LeaseReply(tickets=[pb.Ticket(ticket_id=r.id, step=r.step, attempt=r.attempt, index=r.idx,
                                                shard=r.shard, offset=r.offset) for r in rows], reason=reason)

    async def CommitTicket(self, request, context):
        await self.door(validation.check_commit, request, context)
        result = self.ledger.commit(request.worker_id, request.ticket_id, request.attempt, request.loss,
                                    request.tokens)
        await self.notify()
        return pb.CommitReply(result=_COMMIT[result])

    async def ReleaseTickets(self, request, context):
        await self.door(validation.check_release, request, context)
        n = self.ledger.release(request.worker_id, list(request.ticket_ids), request.reason)
        await self.notify()
        return pb.ReleaseReply(released=n)

    async def ReportStep(self, request, context):
        await self.door(validation.check_step_report, request, context)
        if request.kind == pb.AVERAGING_FAILED:
            ok = self.ledger.averaging_failed(request.worker_id, request.step, request.attempt, escaped(request.detail))
            await self.notify()
            return pb.StepReportReply(accepted=ok)
        commitments = [Submitted(c.ticket_id, c.attempt, c.commitment, c.sent or None, c.returned or None,
                                 c.sent_back or None) for c in request.commitments]
        ok = self.ledger.report(request.worker_id, request.step, request.attempt, _REPORTS.get(request.kind, ""),
                                request.grad_norm_sq, request.micro_batches, request.group_weight,
                                request.state_digest, commitments)
        await self.notify()
        return pb.StepReportReply(accepted=ok)

    async def ReportPeerFailure(self, request, context):
        """Probe the reported peer now: a SIGKILLed worker is declared dead within a second, a live one (the
        reporter's own link failed) keeps its place. Worker text (reason, detail, unable) is kept escaped."""
        await self.door(validation.check_peer_failure, request, context)
        suspect = self.ledger.worker_at(request.address)
        if suspect is None or suspect == request.worker_id:
            return pb.PeerFailureReply(declared_dead=False)
        if not await address_is_down(request.address):
            log.info("%s reported %s at %s failing (%s), but it accepts connections", request.worker_id, suspect,
                     request.address, escaped(request.reason))
            return pb.PeerFailureReply(declared_dead=False)
        self.ledger.declare_dead(suspect, f"{request.worker_id} reported '{escaped(request.reason)}' and "
                                 f"{request.address} refuses connections")
        await self.notify()
        log.warning("worker %s at %s is down (reported by %s): declared dead", suspect, request.address,
                    request.worker_id)
        return pb.PeerFailureReply(declared_dead=True)

    async def Status(self, request, context):
        if request.accept_gzip:  # ~23x fewer bytes for the loop to hand to gRPC (gptjt_core/status_gzip.py)
            return pb.StatusReply(json_gzip=await self.statuses.gzipped())
        return pb.StatusReply(json=(await self.statuses.get()).decode())  # NaN-free, as the dashboard's

    async def PutCheckpoint(self, request_iterator, context):
        """A stage's state into the store, streamed to disk: only from the worker holding that stage
        at that step, within the stage's size bound (coordinator/validation.py), and kept only if it
        hashes to what the header declares (coordinator/checkpoint_store.py Upload)."""
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a checkpoint upload starts with its header")
        header, me = first.header, caller(context)
        await self.door(validation.check_checkpoint_header, header, context)
        spec = StageSpec(header.start_layer, header.end_layer, embed=header.embed, head=header.head)
        refusal = (f"header.worker_id {header.worker_id!r} is not the session's worker {me!r}"
                   if header.worker_id != me else self.ledger.checkpoint_refusal(me, header.step, spec))
        if refusal:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"checkpoint refused: {refusal}")
        if header.stored_at:  # the worker wrote it into the shared store: only the header comes here
            try:  # checked by its size and safetensors header (checkpoint_store.adopt); its digest when read
                path = await asyncio.to_thread(self.store.adopt, header.step, spec, header.stored_at, header.nbytes)
            except (ValueError, OSError) as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"checkpoint refused: {e}")
            forgotten = self.ledger.record_checkpoint(header.step, spec, path, (header.nbytes, header.sha256.lower()))
        else:
            path = await self._receive(self.store.upload(header.step, spec, header.nbytes, header.sha256),
                                       request_iterator, context)
            forgotten = self.ledger.record_checkpoint(header.step, spec, path)
        await self.notify()
        log.info("stored stage %s at step %d (%d bytes) from %s%s", spec, header.step, header.nbytes, me,
                 " (written into the shared store by the worker)" * bool(header.stored_at))
        for step in forgotten:
            try:
                await asyncio.to_thread(self.store.delete, step)
                log.info("deleted checkpoint step %d from the store (coordinator.keep_checkpoints)", step)
            except Exception as e:  # the ledger has already forgotten it: only disk space is lost
                log.warning("could not delete checkpoint step %d from %s (%s); delete it by hand", step,
                            self.store.root, e)
        return pb.CheckpointReply(path=path)

    async def _receive(self, upload, request_iterator, context) -> str:
        """Write the data chunks to `upload` (one at a time, off the event loop) and keep the file,
        or abort."""
        try:
            return await upload.receive(validation.checkpoint_data(request_iterator))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"checkpoint refused: {e}")
        finally:
            upload.discard()

    async def GetCheckpoint(self, request, context):
        await self.door(validation.check_get_checkpoint, request, context)
        spec = StageSpec(request.start_layer, request.end_layer, embed=request.embed, head=request.head)
        try:
            tensors = await asyncio.to_thread(self.store.get, request.step, spec, self.ledger.plan[-1].end,
                                              self.ledger.checkpoints.digests(request.step))
        except FileNotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:  # a file a worker wrote does not hash to what it declared
            log.error("checkpoint step %d: %s", request.step, e)
            await context.abort(grpc.StatusCode.DATA_LOSS, str(e))
        blob = await asyncio.to_thread(save, tensors)
        yield pb.CheckpointChunk(header=pb.CheckpointHeader(step=request.step, start_layer=spec.start,
                                                            end_layer=spec.end, embed=spec.embed, head=spec.head,
                                                            nbytes=len(blob)))
        step = self.ledger.run.pipeline.chunk_bytes
        for i in range(0, len(blob), step):
            yield pb.CheckpointChunk(data=blob[i:i + step])

    async def reap_forever(self, period_s: float = 0.5, prune_every_s: float = 60.0) -> None:
        """Declare silent workers dead (their tickets re-issued, the step restarted if needed); now
        and then, let go of workers long gone and the oldest events."""
        last_prune = 0.0
        while True:
            if time.monotonic() - last_prune > prune_every_s:
                last_prune = time.monotonic()
                workers, events = self.ledger.prune()
                if workers or events:
                    log.info("pruned %d worker(s) gone for over %.0f s and %d old event(s)", workers,
                             self.ledger.run.coordinator.prune_after_s, events)
            try:
                dead = self.ledger.reap()
            except Exception:  # one bad pass must not end reaping for good
                log.exception("reaping failed; trying again")
                dead = []
            for worker_id in dead:
                log.warning("worker %s missed heartbeats for %.0f s: declared dead", worker_id,
                            self.ledger.run.coordinator.heartbeat_timeout_s)
            await self.notify()
            await asyncio.sleep(period_s)
