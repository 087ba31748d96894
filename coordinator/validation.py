"""The coordinator's door: every field of every request checked against the run before the ledger sees it.

Pure (no grpc, no I/O): each `check_*` takes a request message and the run's `RunLimits` and
raises `gptjt_core.wire_checks.Refused` (a gRPC status name, the field path, the value, what
is expected); the servicer answers with that status and writes nothing.

Non-finite measurements. A diverged model honestly reports a NaN or +Inf loss and gradient
norm^2, so those pass the door: the ledger's own rules handle them without stalling (a
non-finite contribution is refused as poisoned and its share estimated from the others, or the
step's update is skipped; a step whose micro-batch losses are not all known records +Inf as its
loss, see ledger/tickets.py). Refusing them here would hand the ticket back, the same
micro-batch would diverge again, and the run would stall. What no honest worker can send (a
negative norm^2 or loss, -Inf, a NaN count or rate) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptjt_core.commitment import DIGEST_BYTES, Commitment
from gptjt_core.config import CODEC_NAMES, RunConfig
from gptjt_core.wire_checks import (INVALID_ARGUMENT, MAX_DETAIL_CHARS, MAX_DHT_MADDRS, MAX_DIGEST_CHARS,
                                    MAX_LINKS, MAX_NAME_CHARS, MAX_PEM_CHARS, MAX_TOKEN_CHARS, RESOURCE_EXHAUSTED, Refused, choice,
                                    dht_key, hex_text, host_port, integer, items, measure, multiaddr, number, text,
                                    word, worker_id)
from gptjt_proto import coordinator_pb2 as pb

from .cost_model import ModelShape, stage_params

WORKER_STATES = {v: pb.WorkerState.Name(v) for v in (pb.LOADING, pb.READY, pb.DRAINING, pb.STANDBY)}
REPORT_KINDS = {v: pb.ReportKind.Name(v) for v in (pb.CONTRIBUTION, pb.AVERAGED, pb.APPLIED, pb.AVERAGING_FAILED)}
DEVICE_DTYPES = ("", "fp32", "bf16", "fp16")  # "": not measured yet

# A stage checkpoint holds, per parameter, fp32 weights (4 bytes) and AdamW's two moments (8);
# local-steps averaging adds the outer anchor and momentum (8). Measured: 12.0 bytes per
# parameter without local steps. The cap allows 25 % and 16 MiB more (safetensors header,
# optimizer step counters, buffers).
CHECKPOINT_BYTES_PER_PARAM = 20
CHECKPOINT_HEADROOM = 1.25
CHECKPOINT_SLACK_BYTES = 16 << 20
MAX_COMMITMENT_BYTES = 1024  # a commitment with both sketches at k = 64 is 598 bytes (docs/security.md)

MAX_STORED_COUNT = 2**31 - 1  # a count the ledger keeps in an INTEGER column (32-bit in PostgreSQL)


@dataclass(frozen=True)
class RunLimits:
    """What a request may say in this run (all from the run config and the model's shape)."""

    n_layer: int
    num_stages: int  # the most stages a plan may have (pipeline.max_stages, else num_stages)
    steps: int  # train.steps
    micro_batch: int
    seq_len: int
    micro_batches_per_step: int
    in_flight: int  # pipeline.in_flight: tickets stage 0 holds at once
    replicas_per_stage: int
    shape: ModelShape | None  # None: no size cap on checkpoints (a ledger without a cost model)

    @staticmethod
    def of(run: RunConfig, n_layer: int, shape: ModelShape | None) -> RunLimits:
        t, p = run.train, run.pipeline
        return RunLimits(n_layer, max(p.stage_counts), t.steps, t.micro_batch, t.seq_len, t.micro_batches_per_step,
                         p.in_flight, p.replicas_per_stage, shape)

    def checkpoint_cap(self, start: int, end: int) -> int | None:
        """Most bytes a checkpoint of layers [start, end) may announce (None: not known)."""
        if self.shape is None:
            return None
        params = stage_params(self.shape, start, end)
        return int(params * CHECKPOINT_BYTES_PER_PARAM * CHECKPOINT_HEADROOM) + CHECKPOINT_SLACK_BYTES


# -- pieces shared by several messages -----------------------------------------------------
def check_device(info: pb.DeviceInfo, where: str) -> None:
    """A device report: the scheduler divides by its rates and plans with its memory."""
    word(f"{where}.kind", info.kind)
    text(f"{where}.name", info.name, MAX_NAME_CHARS)
    integer(f"{where}.memory_bytes", info.memory_bytes, 0)
    number(f"{where}.matmul_tflops", info.matmul_tflops)
    choice(f"{where}.dtype", info.dtype, DEVICE_DTYPES)
    number(f"{where}.block_tflops", info.block_tflops)
    number(f"{where}.head_tflops", info.head_tflops)


def _metrics(m: pb.WorkerMetrics, where: str) -> None:
    number(f"{where}.micro_batches_per_s", m.micro_batches_per_s)
    number(f"{where}.busy_fraction", m.busy_fraction, 0.0, 1.0, "a share of wall time")
    for name in ("bytes_sent", "bytes_received", "micro_batches", "averaging_bytes", "peak_memory_bytes"):
        integer(f"{where}.{name}", getattr(m, name), 0)
    number(f"{where}.downstream_mbit", m.downstream_mbit)
    for name in ("activation_codec", "gradient_codec"):
        choice(f"{where}.{name}", getattr(m, name), {"", *CODEC_NAMES})


def _link(k: pb.LinkMeasurement, where: str) -> None:
    host_port(f"{where}.address", k.address)
    for name in ("latency_ms", "mbit", "measured_unix_s"):
        number(f"{where}.{name}", getattr(k, name))


def _layer_range(start: int, end: int, embed: bool, head: bool, where: str, lim: RunLimits) -> None:
    """0 <= start < end <= n_layer; the embedding goes with layer 0, the head with the last."""
    integer(f"{where}.start_layer", start, 0, lim.n_layer - 1, "the model's layers - 1")
    integer(f"{where}.end_layer", end, start + 1, lim.n_layer, "the model's layers")
    if embed != (start == 0):
        raise Refused(INVALID_ARGUMENT, f"{where}.embed", embed, f"{start == 0} (the embedding is held with layer 0)")
    if head != (end == lim.n_layer):
        raise Refused(INVALID_ARGUMENT, f"{where}.head", head,
                      f"{end == lim.n_layer} (the head is held with the last layer, {lim.n_layer})")


# -- one check per request message -----------------------------------------------------------
def check_join(r: pb.JoinRequest, lim: RunLimits) -> None:
    if len(r.token) > MAX_TOKEN_CHARS:  # never echoed: a token is a secret, even a wrong one
        raise Refused(RESOURCE_EXHAUSTED, "join.token", None, f"at most {MAX_TOKEN_CHARS} characters",
                      show=f"<{len(r.token)} characters>")
    text("join.name", r.name, MAX_NAME_CHARS)
    host_port("join.address", r.address)
    check_device(r.device, "join.device")
    worker_id("join.worker_id", r.worker_id, optional=True)
    text("join.public_key_pem", r.public_key_pem, MAX_PEM_CHARS, printable=False)
    dht_key("join.dht_public_key", r.dht_public_key)


def check_heartbeat(r: pb.HeartbeatRequest, lim: RunLimits) -> None:
    worker_id("heartbeat.worker_id", r.worker_id)
    _metrics(r.metrics, "heartbeat.metrics")
    choice("heartbeat.state", r.state, WORKER_STATES)
    integer("heartbeat.loaded_epoch", r.loaded_epoch, -1)
    integer("heartbeat.position", r.position, -1, lim.steps, "train.steps")
    if r.HasField("device"):
        check_device(r.device, "heartbeat.device")
    items("heartbeat.links", r.links, MAX_LINKS)
    for i, k in enumerate(r.links):
        _link(k, f"heartbeat.links[{i}]")
    number("heartbeat.coordinator_rtt_ms", r.coordinator_rtt_ms)
    items("heartbeat.dht_maddrs", r.dht_maddrs, MAX_DHT_MADDRS)
    for i, m in enumerate(r.dht_maddrs):
        multiaddr(f"heartbeat.dht_maddrs[{i}]", m)


def check_leave(r: pb.LeaveRequest, lim: RunLimits) -> None:
    worker_id("leave.worker_id", r.worker_id)


def check_watch(r: pb.WatchRequest, lim: RunLimits) -> None:
    worker_id("watch.worker_id", r.worker_id)


def check_lease(r: pb.LeaseRequest, lim: RunLimits) -> None:
    worker_id("lease.worker_id", r.worker_id)
    integer("lease.max_tickets", r.max_tickets, 1, lim.in_flight, "pipeline.in_flight: micro-batches in flight")


def check_commit(r: pb.CommitRequest, lim: RunLimits) -> None:
    worker_id("commit.worker_id", r.worker_id)
    integer("commit.ticket_id", r.ticket_id, 1)
    integer("commit.attempt", r.attempt, 0)
    measure("commit.loss", r.loss)
    integer("commit.tokens", r.tokens, 0, lim.micro_batch * lim.seq_len, "train.micro_batch x train.seq_len")


def check_release(r: pb.ReleaseRequest, lim: RunLimits) -> None:
    worker_id("release.worker_id", r.worker_id)
    # A worker holds at most pipeline.in_flight leases, of one step's micro-batches.
    items("release.ticket_ids", r.ticket_ids, max(lim.micro_batches_per_step, lim.in_flight))
    for i, t in enumerate(r.ticket_ids):
        integer(f"release.ticket_ids[{i}]", t, 1)
    text("release.reason", r.reason, MAX_DETAIL_CHARS)  # shown to operators: printable only


def check_step_report(r: pb.StepReport, lim: RunLimits) -> None:
    """Every field, whatever the kind (an honest worker leaves the others at their defaults)."""
    worker_id("report.worker_id", r.worker_id)
    integer("report.step", r.step, 0, lim.steps - 1, "train.steps - 1: the last step")
    integer("report.attempt", r.attempt, 0)
    choice("report.kind", r.kind, REPORT_KINDS)
    measure("report.grad_norm_sq", r.grad_norm_sq)
    # A replica may keep more micro-batches than the step has: a ticket handed back after it kept
    # the gradient is done again (ledger/steps._overcounted restarts the step). Refusing such a
    # count here stopped an honest worker (a chaos soak, 2026-12-07); the cap only keeps out what
    # the ledger cannot store (its column is a 32-bit INTEGER in PostgreSQL).
    integer("report.micro_batches", r.micro_batches, 0, MAX_STORED_COUNT, "2^31 - 1: what the ledger stores")
    # every-step mode sums micro-batches; local-steps mode weighs each replica 1
    number("report.group_weight", r.group_weight, 0.0, max(lim.micro_batches_per_step, lim.replicas_per_stage),
           "micro-batches per step (or replicas per stage in local-steps mode)")
    hex_text("report.state_digest", r.state_digest, MAX_DIGEST_CHARS)
    text("report.detail", r.detail, MAX_DETAIL_CHARS, printable=False)
    _commitments(r.commitments, lim)


def _commitments(commitments, lim: RunLimits) -> None:
    """At most one per micro-batch of the step, each a commitment that parses (the ledger keeps them)."""
    items("report.commitments", commitments, lim.micro_batches_per_step)
    for i, c in enumerate(commitments):
        where = f"report.commitments[{i}]"
        integer(f"{where}.ticket_id", c.ticket_id, 1)
        integer(f"{where}.attempt", c.attempt, 0)
        size = f"{len(c.commitment)} bytes"
        if len(c.commitment) > MAX_COMMITMENT_BYTES:
            raise Refused(RESOURCE_EXHAUSTED, f"{where}.commitment", size, f"at most {MAX_COMMITMENT_BYTES} bytes",
                          show=size)
        try:
            Commitment.from_bytes(c.commitment)
        except ValueError as e:
            raise Refused(INVALID_ARGUMENT, f"{where}.commitment", size, f"a commitment that parses ({e})",
                          show=size) from None
        for name in ("sent", "returned", "sent_back"):
            if len(getattr(c, name)) not in (0, DIGEST_BYTES):
                raise Refused(INVALID_ARGUMENT, f"{where}.{name}", f"{len(getattr(c, name))} bytes",
                              f"a {DIGEST_BYTES}-byte digest, or nothing", show=f"{len(getattr(c, name))} bytes")


def check_check_report(r: pb.CheckReport, lim: RunLimits) -> None:
    """A verifier's answer to a spot check: a commitment that parses, or why there is none."""
    worker_id("check_report.worker_id", r.worker_id)
    integer("check_report.check_id", r.check_id, 1)
    text("check_report.unable", r.unable, MAX_DETAIL_CHARS, printable=False)
    if not r.commitment and not r.unable:
        raise Refused(INVALID_ARGUMENT, "check_report", "neither a commitment nor a reason",
                      "the recomputed commitment, or in `unable` why there is none")
    if r.commitment:
        size = f"{len(r.commitment)} bytes"
        if len(r.commitment) > MAX_COMMITMENT_BYTES:
            raise Refused(RESOURCE_EXHAUSTED, "check_report.commitment", size,
                          f"at most {MAX_COMMITMENT_BYTES} bytes", show=size)
        try:
            Commitment.from_bytes(r.commitment)
        except ValueError as e:
            raise Refused(INVALID_ARGUMENT, "check_report.commitment", size, f"a commitment that parses ({e})",
                          show=size) from None


def check_peer_failure(r: pb.PeerFailure, lim: RunLimits) -> None:
    worker_id("peer_failure.worker_id", r.worker_id)
    host_port("peer_failure.address", r.address)
    text("peer_failure.reason", r.reason, MAX_DETAIL_CHARS, printable=False)


def check_checkpoint_header(h: pb.CheckpointHeader, lim: RunLimits) -> None:
    """An upload's header, before any of its bytes is taken."""
    worker_id("checkpoint.worker_id", h.worker_id)
    integer("checkpoint.step", h.step, 0, lim.steps, "train.steps")
    _layer_range(h.start_layer, h.end_layer, h.embed, h.head, "checkpoint", lim)
    cap = lim.checkpoint_cap(h.start_layer, h.end_layer)
    if h.nbytes <= 0:
        raise Refused(INVALID_ARGUMENT, "checkpoint.nbytes", h.nbytes, "the blob's size in bytes, > 0")
    if cap is not None and h.nbytes > cap:
        raise Refused(RESOURCE_EXHAUSTED, "checkpoint.nbytes", h.nbytes,
                      f"at most {cap} bytes for layers {h.start_layer}-{h.end_layer} (fp32 weights and AdamW "
                      "state of those layers, with headroom)")
    hex_text("checkpoint.sha256", h.sha256, 64)
    if len(h.sha256) != 64:
        raise Refused(INVALID_ARGUMENT, "checkpoint.sha256", h.sha256, "the blob's SHA-256: 64 hex characters")
    text("checkpoint.stored_at", h.stored_at, 4096)  # the store checks it is the layout's path


async def checkpoint_data(chunks):
    """The bytes of an upload's chunks after its header, one chunk at a time as they are asked for
    (ValueError on a second header)."""
    async for chunk in chunks:
        if chunk.WhichOneof("part") != "data":
            raise ValueError("a second header in one checkpoint upload")
        yield chunk.data


def check_get_checkpoint(r: pb.GetCheckpointRequest, lim: RunLimits) -> None:
    integer("get_checkpoint.step", r.step, 0, lim.steps, "train.steps")
    _layer_range(r.start_layer, r.end_layer, r.embed, r.head, "get_checkpoint", lim)
