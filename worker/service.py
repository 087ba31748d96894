"""The Stage gRPC servicer: receive a micro-batch, run this stage's work on it, return its gradient."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from gptjt_core.config import PipelineConfig
from gptjt_core.wire_checks import Refused
from gptjt_proto import stage_pb2 as pb
from gptjt_proto import stage_pb2_grpc as pb_grpc

from .commitments import received_parts
from .compute import OTHER, ComputeQueue
from .evidence import MAX_EVIDENCE_BYTES
from .faults import Faults
from .lies import altered_state
from .downstream import DownstreamSender
from .micro_batch_validation import StageLimits
from .micro_batch_work import StageInput, work_micro_batch
from .routing import NoReplicaAvailable
from .stage import LayerSlice, StaleMicroBatch
from .stage_tls import caller_identity
from .transport import LinkCounters, gradient_reply, read_micro_batch
from .wire import data_chunks

log = logging.getLogger(__name__)

MAX_PROBE_BYTES = 4 << 20  # a link probe's payload (worker/link_probe.py grows one up to this)
CATCH_UP_S = 2.0  # how long a micro-batch of a step this worker does not know open yet waits for it

# Downstream failures the caller should see as they are; anything else becomes ABORTED ("a stage
# beyond you failed"), so the caller does not blame this worker for it.
_PASS_THROUGH = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class Serving:
    """What this worker serves at one moment; read afresh for every call, as the coordinator
    can move the worker to another stage between calls."""

    stage: LayerSlice | None  # None: no stage loaded yet, or standby
    index: int | None  # the assigned stage (-1: standby); None before the first assignment
    loaded: bool  # the stage holds state the run restored (not one still loading)
    pipeline: PipelineConfig
    downstream: DownstreamSender  # to the next stage's replicas
    open_step: tuple[int, int] | None = None  # (step, attempt) the coordinator has open; None: none open
    upstream: frozenset[str] | None = None  # who may send micro-batches (None: plaintext links, anyone)
    fetchers: frozenset[str] | None = None  # who may copy the stage's state (besides operator tools)
    replicas: frozenset[str] | None = None  # who may fetch spot-check evidence: this stage's members
    verifiers: frozenset[str] = frozenset()  # and standbys with a check of our work (a stage with one replica)
    loss_scale: float = 1.0  # the open attempt's loss scale (RunState.loss_scale), which the last stage applies


class StageService(pb_grpc.StageServicer):
    """Answers the previous stage (Process), joiners copying the stage (FetchState) and link
    probes. `serving` says what the worker holds now (None until it has joined a run)."""

    def __init__(self, compute: ComputeQueue, counters: LinkCounters, serving: Callable[[], Serving | None],
                 faults: Faults | None = None):
        self.compute = compute
        self.counters = counters
        self.serving = serving
        self.faults = faults  # GPTJT_FAULTS (tests and drills): lie-state alters the state FetchState sends

    async def Probe(self, request, context):
        """A link measurement (worker/link_probe.py): the payload is only counted."""
        if len(request.payload) > MAX_PROBE_BYTES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"probe payload of {len(request.payload)} bytes; a probe carries at most "
                                f"{MAX_PROBE_BYTES} bytes")
        return pb.ProbeReply(received_bytes=len(request.payload))

    async def Process(self, request_iterator, context):
        s = self.serving()
        who = caller_identity(context)
        if s is not None and s.upstream is not None and who not in s.upstream:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{who!r} is not placed before this stage; only its previous stage's workers may "
                                "send it micro-batches")
        if s is None or s.stage is None or s.index is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no stage yet")
        stage, pipeline = s.stage, s.pipeline
        if stage.spec.embed:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this worker holds stage 0, which reads tokens itself and takes no activations")
        limits = StageLimits.of(stage.run, s.index, stage.model.config.n_embd, stage.model.config.vocab_size)
        try:
            inc = await read_micro_batch(request_iterator, limits, self.counters)
        except Refused as e:
            log.warning("refused a micro-batch from %s: %s", context.peer(), e)
            await context.abort(grpc.StatusCode[e.code], str(e))
        h = inc.header
        refusal, loss_scale = await self._for_the_open_step(h.step, h.attempt)
        if refusal:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        started = time.perf_counter()  # compute_s in the reply: the caller tells link time from ours
        grad_codec = h.gradient_codec or pipeline.gradient_codec  # the caller picks it for its link

        def next_header() -> pb.MicroBatchHeader:
            down = pb.MicroBatchHeader()
            down.CopyFrom(h)
            down.stage = h.stage + 1
            return down

        item = StageInput((h.ticket_id, h.attempt), h.step, inc.activations, inc.prefix_lengths, inc.labels,
                          h.global_batch, received_parts(h, inc.payload), grad_codec, loss_scale)
        try:
            done = await work_micro_batch(stage, self.compute, s.downstream, item, next_header)
        except StaleMicroBatch as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except NoReplicaAvailable as e:
            await context.abort(grpc.StatusCode.ABORTED, f"stage {h.stage + 1}: {e}")
        except grpc.aio.AioRpcError as e:
            code = e.code() if e.code() in _PASS_THROUGH else grpc.StatusCode.ABORTED
            await context.abort(code, f"stage {h.stage + 1}: {e.details()}")
        for chunk in gradient_reply(done.loss, done.target_tokens, done.sent_grad, pipeline.chunk_bytes, self.counters,
                                    time.perf_counter() - started):
            yield chunk

    async def _for_the_open_step(self, step: int, attempt: int) -> tuple[str, float]:
        """Why a micro-batch of (step, attempt) is refused ("" if it is for the step the coordinator
        has open), and that attempt's loss scale. The first micro-batch of a new step may come
        before this worker's Watch stream says the step opened: such a one waits up to
        CATCH_UP_S for it (the scale comes with the same RunState)."""
        deadline = time.monotonic() + CATCH_UP_S
        while True:
            s = self.serving()
            current = s.open_step if s is not None else None
            if current == (step, attempt):
                return "", s.loss_scale
            if (current is not None and current > (step, attempt)) or time.monotonic() > deadline:
                return (f"micro-batch of step {step} attempt {attempt}: the open step is "
                        + (f"{current[0]} attempt {current[1]}" if current else "none (no step is open)")), 1.0
            await asyncio.sleep(0.02)

    async def FetchState(self, request, context):
        """Weights + optimizer state and how many steps they hold, taken on the compute thread so
        no optimizer step lands halfway through. Only for the joiners the coordinator names, and
        for the operator's tools (gptjt export)."""
        s = self.serving()
        who = caller_identity(context)
        if s is not None and s.fetchers is not None and who not in s.fetchers and not who.startswith("operator-"):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{who!r} may not copy this stage: the coordinator names the replicas that copy it")
        if s is None or s.stage is None or not s.loaded:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no stage")
        stage = s.stage
        blob, position = await self.compute.run(OTHER, lambda: (stage.checkpoint_blob(), stage.position))
        if self.faults is not None:
            blob = await asyncio.to_thread(altered_state, blob, position, self.faults)
        spec = stage.spec
        yield pb.StageChunk(state=pb.StateHeader(nbytes=len(blob), position=position, stage=s.index,
                                                 start_layer=spec.start, end_layer=spec.end))
        for chunk in data_chunks(blob, s.pipeline.chunk_bytes):
            yield chunk

    async def FetchEvidence(self, request, context):
        """What this stage received for one recent micro-batch, for a replica spot-checking it
        (worker/spot_check.py). Only the stage's members and the standbys holding a check of our
        work (the coordinator names both) may ask: the bytes are the previous stage's activations."""
        s = self.serving()
        who = caller_identity(context)
        if s is not None and s.replicas is not None and who not in s.replicas | s.verifiers:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{who!r} is no replica of this stage nor a standby checking it; only they may "
                                "fetch evidence")
        if s is None or s.stage is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds no stage")
        evidence = s.stage.evidence.get((request.ticket_id, request.attempt))
        if evidence is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no evidence of ticket {request.ticket_id} attempt {request.attempt}: this stage "
                                "keeps the micro-batches of its last two steps only")
        if evidence.nbytes > MAX_EVIDENCE_BYTES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"evidence of {evidence.nbytes} bytes is above the {MAX_EVIDENCE_BYTES} one message "
                                "takes")
        return evidence.to_pb()
