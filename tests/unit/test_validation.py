"""The coordinator's validation layer (coordinator/validation.py): every field of every request message.

Table-driven: a good message of each kind passes; each case sets one field of a good message to
a bad value and expects the status name, the field path and the value in the refusal. A test
checks that the table touches every field the protos define.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from coordinator.scheduler import model_shape
from coordinator.validation import (RunLimits, check_check_report, check_checkpoint_header, check_commit,
                                    check_get_checkpoint, check_heartbeat, check_join, check_lease, check_leave,
                                    check_peer_failure, check_release, check_step_report, check_watch)
from gptjt_core.commitment import Commitment, input_digest
from gptjt_core.sketching import sketch_tensor
from gptjt_core.wire_checks import Refused, escaped, shown
from gptjt_proto import coordinator_pb2 as pb
from tests.conftest import small_run

NAN, INF = float("nan"), float("inf")
WID = "0123456789ab"
TINY = model_shape(4, 128, 512, 50400)


def limits() -> RunLimits:
    """10 steps of 4 micro-batches of 2 x 64 tokens, 2 stages (3 in flight), 2 replicas, 4 layers."""
    run = small_run(steps=10, global_batch=8, micro_batch=2, seq_len=64)
    run.pipeline.num_stages, run.pipeline.replicas_per_stage = 2, 2
    return RunLimits.of(run, 4, TINY)


LIM = limits()


def device() -> pb.DeviceInfo:
    return pb.DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 << 30, matmul_tflops=400.0,
                         dtype="bf16", block_tflops=300.0, head_tflops=120.0)


def link() -> pb.LinkMeasurement:
    return pb.LinkMeasurement(address="10.0.0.6:7002", latency_ms=4.0, mbit=900.0, measured_unix_s=1.7e9)


COMMITMENT = Commitment(input_digest(b"codes"), sketch_tensor(math.pi * torch.ones(2, 8, 16)),
                        sketch_tensor(torch.ones(2, 8, 16))).to_bytes()  # 598 bytes


def commitment(ticket_id: int = 5) -> pb.MicroBatchCommitment:
    return pb.MicroBatchCommitment(ticket_id=ticket_id, attempt=1, commitment=COMMITMENT, sent=b"s" * 32,
                                   returned=b"r" * 32, sent_back=b"b" * 32)


GOOD = {
    "join": lambda: pb.JoinRequest(token="gptjt_abc", name="host-1", address="10.0.0.5:7001", device=device(),
                                   public_key_pem="-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n",
                                   dht_public_key=b"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7+/="),
    "heartbeat": lambda: pb.HeartbeatRequest(
        worker_id=WID, state=pb.READY, loaded_epoch=1, position=3, device=device(), links=[link()],
        coordinator_rtt_ms=1.5, dht_maddrs=["/ip4/10.0.0.5/tcp/31337/p2p/QmPeer"],
        metrics=pb.WorkerMetrics(micro_batches_per_s=2.0, busy_fraction=0.8, bytes_sent=10, bytes_received=20,
                                 micro_batches=7, downstream_mbit=800.0, activation_codec="q4",
                                 gradient_codec="fp16", averaging_bytes=30)),
    "leave": lambda: pb.LeaveRequest(worker_id=WID),
    "watch": lambda: pb.WatchRequest(worker_id=WID),
    "lease": lambda: pb.LeaseRequest(worker_id=WID, max_tickets=3),
    "commit": lambda: pb.CommitRequest(worker_id=WID, ticket_id=5, attempt=0, loss=0.7, tokens=128),
    "release": lambda: pb.ReleaseRequest(worker_id=WID, ticket_ids=[5, 6], reason="DataError: no such file"),
    "report": lambda: pb.StepReport(worker_id=WID, step=3, attempt=1, kind=pb.CONTRIBUTION, grad_norm_sq=2.5,
                                    micro_batches=4, group_weight=4.0, state_digest="ab" * 16, detail="",
                                    commitments=[commitment()]),
    "peer_failure": lambda: pb.PeerFailure(worker_id=WID, address="10.0.0.6:7002", reason="UNAVAILABLE: reset"),
    "checkpoint": lambda: pb.CheckpointHeader(worker_id=WID, step=10, start_layer=0, end_layer=2, embed=True,
                                              head=False, nbytes=1000, sha256="0f" * 32),
    "get_checkpoint": lambda: pb.GetCheckpointRequest(step=0, start_layer=2, end_layer=4, embed=False, head=True),
}
CHECKS = {"join": check_join, "heartbeat": check_heartbeat, "leave": check_leave, "watch": check_watch,
          "lease": check_lease, "commit": check_commit, "release": check_release, "report": check_step_report,
          "peer_failure": check_peer_failure, "checkpoint": check_checkpoint_header,
          "get_checkpoint": check_get_checkpoint}

IA, OOR, RE = "INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED"
CKPT_CAP = LIM.checkpoint_cap(0, 2)

# (message, field path, bad value, status, the value as the refusal shows it (default: shown(value)))
BAD = [
    ("join", "token", "t" * 257, RE, "<257 characters>"),
    ("join", "name", "n" * 257, RE, None),
    ("join", "public_key_pem", "k" * 4097, RE, None),
    ("join", "name", "two\nlines", IA, None),
    ("join", "address", "", IA, None),
    ("join", "address", "10.0.0.5", IA, None),
    ("join", "address", "10.0.0.5:0", IA, None),
    ("join", "address", "10.0.0.5:70000", IA, None),
    ("join", "address", "bad host:7001", IA, None),
    ("join", "address", "h" * 300 + ":1", RE, None),
    ("join", "worker_id", "xyz", IA, None),
    ("join", "worker_id", "0123456789AB", IA, None),
    ("join", "worker_id", "0123456789abc", IA, None),
    ("join", "dht_public_key", b"ssh-rsa " + b"A" * 1017, RE, None),
    ("join", "dht_public_key", b"-----BEGIN PUBLIC KEY-----\nMFkw", IA, None),
    ("join", "dht_public_key", b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", IA, None),
    ("join", "dht_public_key", b"ssh-rsa AAAA\x00", IA, None),
    ("heartbeat", "worker_id", "", IA, None),
    ("heartbeat", "metrics.micro_batches_per_s", NAN, IA, None),
    ("heartbeat", "metrics.micro_batches_per_s", -1.0, IA, None),
    ("heartbeat", "metrics.busy_fraction", 1.5, OOR, None),
    ("heartbeat", "metrics.busy_fraction", NAN, IA, None),
    ("heartbeat", "metrics.bytes_sent", -1, IA, None),
    ("heartbeat", "metrics.bytes_received", -1, IA, None),
    ("heartbeat", "metrics.micro_batches", -1, IA, None),
    ("heartbeat", "metrics.downstream_mbit", INF, IA, None),
    ("heartbeat", "metrics.activation_codec", "zip", IA, None),
    ("heartbeat", "metrics.gradient_codec", "zip", IA, None),
    ("heartbeat", "metrics.averaging_bytes", -1, IA, None),
    ("heartbeat", "metrics.peak_memory_bytes", -1, IA, None),
    ("heartbeat", "state", pb.WORKER_STATE_UNSPECIFIED, IA, None),
    ("heartbeat", "state", 9, IA, None),
    ("heartbeat", "loaded_epoch", -2, IA, None),
    ("heartbeat", "position", -2, IA, None),
    ("heartbeat", "position", 11, OOR, None),
    ("heartbeat", "links", [link() for _ in range(65)], RE, "65 items"),
    ("heartbeat", "links[0].address", "nowhere", IA, None),
    ("heartbeat", "links[0].latency_ms", NAN, IA, None),
    ("heartbeat", "links[0].mbit", -1.0, IA, None),
    ("heartbeat", "links[0].measured_unix_s", INF, IA, None),
    ("heartbeat", "coordinator_rtt_ms", NAN, IA, None),
    ("heartbeat", "dht_maddrs", ["/ip4/1.2.3.4/tcp/1"] * 9, RE, "9 items"),
    ("heartbeat", "dht_maddrs[0]", "ip4/1.2.3.4/tcp/1", IA, None),
    ("heartbeat", "dht_maddrs[0]", "/" + "x" * 300, RE, None),
    ("leave", "worker_id", "someone", IA, None),
    ("watch", "worker_id", "", IA, None),
    ("lease", "worker_id", "someone", IA, None),
    ("lease", "max_tickets", 0, IA, None),
    ("lease", "max_tickets", 4, OOR, None),  # 2 stages: 3 in flight
    ("commit", "worker_id", "someone", IA, None),
    ("commit", "ticket_id", 0, IA, None),
    ("commit", "attempt", -1, IA, None),
    ("commit", "loss", -0.5, IA, None),
    ("commit", "loss", -INF, IA, None),
    ("commit", "tokens", -1, IA, None),
    ("commit", "tokens", 129, OOR, None),  # micro_batch x seq_len = 128
    ("release", "worker_id", "someone", IA, None),
    ("release", "ticket_ids", [1, 2, 3, 4, 5], RE, "5 items"),  # 4 micro-batches a step
    ("release", "ticket_ids[1]", 0, IA, None),
    ("release", "reason", "r" * 501, RE, None),
    ("release", "reason", "DataError: \x1b[2J", IA, None),  # operators read it in a terminal
    ("report", "worker_id", "someone", IA, None),
    ("report", "step", -1, IA, None),
    ("report", "step", 10, OOR, None),
    ("report", "attempt", -1, IA, None),
    ("report", "kind", pb.REPORT_KIND_UNSPECIFIED, IA, None),
    ("report", "kind", 7, IA, None),
    ("report", "grad_norm_sq", -1.0, IA, None),  # once stored as a complex norm: the ledger was bricked
    ("report", "grad_norm_sq", -INF, IA, None),
    ("report", "micro_batches", -1, IA, None),
    ("report", "micro_batches", 2**31, OOR, None),  # 5 of 4 is a re-done ticket: the ledger restarts the step
    ("report", "group_weight", NAN, IA, None),
    ("report", "group_weight", 4.5, OOR, None),
    ("report", "state_digest", "XYZ", IA, None),
    ("report", "state_digest", "a" * 129, RE, None),
    ("report", "detail", "d" * 501, RE, None),
    ("report", "commitments", [commitment(t) for t in range(1, 6)], RE, "5 items"),  # 4 micro-batches a step
    ("report", "commitments[0].ticket_id", 0, IA, None),
    ("report", "commitments[0].attempt", -1, IA, None),
    ("report", "commitments[0].commitment", b"", IA, "0 bytes"),
    ("report", "commitments[0].commitment", COMMITMENT[:-1], IA, "597 bytes"),  # truncated gradient sketch
    ("report", "commitments[0].commitment", b"\x02" + COMMITMENT[1:], IA, "598 bytes"),  # an unknown version
    ("report", "commitments[0].commitment", COMMITMENT + bytes(427), RE, "1025 bytes"),
    ("report", "commitments[0].sent", b"s" * 31, IA, "31 bytes"),
    ("report", "commitments[0].returned", b"r" * 33, IA, "33 bytes"),
    ("report", "commitments[0].sent_back", b"x", IA, "1 bytes"),
    ("peer_failure", "worker_id", "", IA, None),
    ("peer_failure", "address", "nowhere", IA, None),
    ("peer_failure", "reason", "r" * 501, RE, None),
    ("checkpoint", "worker_id", "", IA, None),
    ("checkpoint", "step", -1, IA, None),
    ("checkpoint", "step", 11, OOR, None),
    ("checkpoint", "start_layer", -1, IA, None),
    ("checkpoint", "start_layer", 4, OOR, None),
    ("checkpoint", "end_layer", 0, IA, None),
    ("checkpoint", "end_layer", 999, OOR, None),
    ("checkpoint", "embed", False, IA, None),
    ("checkpoint", "head", True, IA, None),
    ("checkpoint", "nbytes", 0, IA, None),
    ("checkpoint", "nbytes", CKPT_CAP + 1, RE, None),
    ("checkpoint", "sha256", "", IA, None),
    ("checkpoint", "sha256", "0f" * 31, IA, None),
    ("checkpoint", "sha256", "0F" * 32, IA, None),
    ("checkpoint", "stored_at", "s3://run/" + "x" * 4096, RE, None),
    ("checkpoint", "stored_at", "s3://run\nstep", IA, None),
    ("get_checkpoint", "step", -1, IA, None),
    ("get_checkpoint", "step", 11, OOR, None),
    ("get_checkpoint", "start_layer", -1, IA, None),
    ("get_checkpoint", "end_layer", 999, OOR, None),
    ("get_checkpoint", "embed", True, IA, None),
    ("get_checkpoint", "head", False, IA, None),
] + [(kind, f"device.{name}", value, code, None) for kind in ("join", "heartbeat") for name, value, code in [
    ("kind", "CUDA!", IA), ("name", "g" * 257, RE), ("memory_bytes", -1, IA), ("matmul_tflops", NAN, IA),
    ("matmul_tflops", -1.0, IA), ("matmul_tflops", INF, IA), ("dtype", "fp8", IA), ("block_tflops", NAN, IA),
    ("block_tflops", -INF, IA), ("head_tflops", NAN, IA), ("head_tflops", -1.0, IA), ("head_tflops", INF, IA)]]

# Values at the edge of what is accepted (an honest worker may send each).
EDGES = [
    ("join", "worker_id", WID), ("join", "device", pb.DeviceInfo()), ("join", "address", "[::1]:7001"),
    ("join", "dht_public_key", b""), ("join", "dht_public_key", b"ssh-rsa " + b"A" * 1016),
    ("join", "address", "worker-3.example.org:65535"), ("join", "device.kind", "simulated"),
    ("heartbeat", "position", -1), ("heartbeat", "loaded_epoch", -1), ("heartbeat", "metrics.busy_fraction", 1.0),
    ("heartbeat", "links", [link() for _ in range(64)]), ("heartbeat", "dht_maddrs", ["/ip4/1.2.3.4/tcp/1"] * 8),
    ("heartbeat", "metrics.activation_codec", ""), ("heartbeat", "state", pb.STANDBY), ("lease", "max_tickets", 1),
    ("commit", "loss", NAN), ("commit", "loss", INF), ("commit", "loss", 0.0), ("commit", "tokens", 0),
    ("release", "ticket_ids", [1, 2, 3, 4]), ("report", "grad_norm_sq", NAN), ("report", "grad_norm_sq", INF),
    ("report", "micro_batches", 5),  # of 4 a step: a ticket redone after its gradient was kept (steps._overcounted)
    ("report", "kind", pb.AVERAGING_FAILED), ("report", "detail", "d\n" * 250), ("report", "step", 9),
    ("report", "commitments", [commitment(t) for t in range(1, 5)]), ("report", "commitments", []),
    ("report", "commitments[0].sent", b""), ("report", "commitments[0].sent_back", b""),
    ("checkpoint", "nbytes", CKPT_CAP), ("get_checkpoint", "step", 10),
]


def set_field(message, path: str, value) -> None:
    """Set `path` ('links[0].mbit', 'ticket_ids[1]', 'metrics.busy_fraction') of `message`."""
    *parents, last = path.split(".")
    for part in parents:
        name, _, index = part.partition("[")
        message = getattr(message, name)[int(index[:-1])] if index else getattr(message, name)
    name, _, index = last.partition("[")
    if index:
        getattr(message, name)[int(index[:-1])] = value
    elif isinstance(value, list):
        del getattr(message, name)[:]
        getattr(message, name).extend(value)
    elif hasattr(value, "DESCRIPTOR"):
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_a_good_message_passes(kind):
    CHECKS[kind](GOOD[kind](), LIM)


@pytest.mark.parametrize("kind,path,value", EDGES, ids=[f"{k}.{p}={v!r:.20}" for k, p, v in EDGES])
def test_values_an_honest_worker_may_send_pass(kind, path, value):
    message = GOOD[kind]()
    set_field(message, path, value)
    CHECKS[kind](message, LIM)


@pytest.mark.parametrize("kind,path,value,code,shows", BAD, ids=[f"{k}.{p}={v!r:.20}" for k, p, v, _, _ in BAD])
def test_a_bad_field_is_refused_naming_field_and_value(kind, path, value, code, shows):
    message = GOOD[kind]()
    set_field(message, path, value)
    with pytest.raises(Refused) as refused:
        CHECKS[kind](message, LIM)
    e, field = refused.value, f"{kind}.{path.split('[')[0] if isinstance(value, list) else path}"
    assert (e.code, e.field) == (code, field), str(e)
    assert str(e).startswith(f"{field} = {shows or shown(value)} refused: expected ")
    if path == "token":
        assert value not in str(e)  # a token is a secret, even a wrong one


def test_every_field_of_every_request_is_in_the_table():
    """Each field of each request message, and of the messages inside them, has a bad case."""
    touched = {(kind, re.sub(r"\[\d+\]", "", path)) for kind, path, *_ in BAD}
    for kind, make in GOOD.items():
        for f in make().DESCRIPTOR.fields:
            names = [f.name] if f.message_type is None else [f"{f.name}.{sub.name}" for sub in f.message_type.fields]
            for name in names:
                assert (kind, name) in touched, f"{kind}.{name} has no bad case"


def test_the_checkpoint_cap_comes_from_the_model_shape():
    """fp32 weights + AdamW moments + local-steps state, with headroom: a full-range 6B upload
    may not announce more than that (the issue's forged upload named layers 0-999)."""
    from coordinator.cost_model import stage_params

    gptj = RunLimits.of(small_run(steps=10), 28, model_shape(28, 4096, 16384, 50400))
    cap = gptj.checkpoint_cap(0, 28)
    params = stage_params(gptj.shape, 0, 28)
    assert 20 * params < cap < 26 * params  # ~6B params: 12 bytes each measured, 20 with local steps
    assert gptj.checkpoint_cap(5, 6) < cap / 20  # one block of 28, no embedding or head
    assert RunLimits.of(small_run(), 4, None).checkpoint_cap(0, 4) is None
    assert math.isfinite(cap)


def test_a_commitment_that_does_not_parse_is_refused_with_the_reason():
    report = GOOD["report"]()
    report.commitments[0].commitment = b"\x02" + COMMITMENT[1:]
    with pytest.raises(Refused, match=r"report\.commitments\[0\]\.commitment = 598 bytes refused: expected a "
                                      r"commitment that parses \(commitment version 2 is unknown"):
        check_step_report(report, LIM)


def test_free_text_a_worker_may_send_with_newlines_is_escaped_onto_one_line():
    """report.detail, check_report.unable and peer_failure.reason are not refused for an exception's
    newlines; the coordinator keeps them escaped (coordinator/server.py), never raw."""
    for field, request in (("detail", "report"), ("unable", "check_report"), ("reason", "peer_failure")):
        r = pb.CheckReport(worker_id=WID, check_id=1) if request == "check_report" else GOOD[request]()
        setattr(r, field, "Traceback:\n  boom\x1b[2J\tend")
        (check_check_report if request == "check_report" else CHECKS[request])(r, LIM)  # accepted at the door
    assert escaped("Traceback:\n  boom\x1b[2J\tend") == "Traceback:\\n  boom\\x1b[2J\\tend"
    assert escaped("plain text, é ü 中") == "plain text, é ü 中"  # printable text is left as it is
    assert "\n" not in escaped("a\r\nb\u2028c") and escaped("a\u2028c") == "a\\u2028c"
