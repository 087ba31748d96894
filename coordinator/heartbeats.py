"""A worker's heartbeat as the ledger takes it, and the coordinator's reply.

One heartbeat arrives either as a call of its own (Heartbeat, which clients of an older version
use) or as a message of the stream a worker holds open (Heartbeats, which gptjt-worker uses);
both are recorded and answered here, so the two cannot drift apart. The stream is the cheap
path: in `gptjt bench heartbeat`'s setting a message cost the coordinator ~85 µs of CPU against
~300 µs for a unary call (bare grpc.aio servers with uvloop on this repository's 2-core machine,
2026-12-07), before our interceptors, which run once a call and so once a stream.
"""

from __future__ import annotations

from gptjt_proto import coordinator_pb2 as pb

from .ledger import RunLedger

WORKER_STATES = {pb.LOADING: "loading", pb.READY: "ready", pb.DRAINING: "draining", pb.STANDBY: "standby"}


def answer_heartbeat(ledger: RunLedger, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
    """Record a checked heartbeat (validation.check_heartbeat has passed) and answer it: whether
    the coordinator still knows the worker, and the spot checks it asks of it."""
    m = request.metrics
    metrics = {"micro_batches_per_s": m.micro_batches_per_s, "busy_fraction": m.busy_fraction,
               "bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received, "micro_batches": m.micro_batches,
               "downstream_mbit": m.downstream_mbit, "activation_codec": m.activation_codec,
               "gradient_codec": m.gradient_codec, "averaging_bytes": m.averaging_bytes,
               "peak_memory_bytes": m.peak_memory_bytes}
    device = device_fields(request.device) if request.HasField("device") else None
    links = [{"address": k.address, "latency_ms": k.latency_ms, "mbit": k.mbit,
              "measured_unix_s": k.measured_unix_s} for k in request.links]
    known = ledger.heartbeat(request.worker_id, WORKER_STATES.get(request.state, ""), metrics,
                             request.loaded_epoch, request.position, device, links,
                             request.coordinator_rtt_ms, list(request.dht_maddrs))
    pending = ledger.spot_checks.pending_for(request.worker_id, ledger.restore_epoch) if known else []
    checks = [pb.SpotCheck(check_id=c["id"], step=c["step"], attempt=c["attempt"], ticket_id=c["ticket"],
                           stage=c["stage"], worker_id=c["worker"], address=c["address"] or "",
                           commitment=c["blob"], returned=c["returned"] or b"", weights=c["weights"] or "",
                           loss_scale=c["loss_scale"] or 0.0, **_layers(c["spec"])) for c in pending]
    return pb.HeartbeatReply(known=known, checks=checks)


def _layers(spec) -> dict:
    """A spot check's layer fields for a StageSpec (None: the plan has no such stage now)."""
    if spec is None:
        return {}
    return {"start_layer": spec.start, "end_layer": spec.end, "embed": spec.embed, "head": spec.head}


def device_fields(info: pb.DeviceInfo) -> dict:
    """The DeviceInfo as the ledger stores it, every field (validation.check_device has checked them)."""
    return {field.name: getattr(info, field.name) for field in info.DESCRIPTOR.fields}
