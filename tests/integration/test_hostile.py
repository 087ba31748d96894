"""A hostile client against a live swarm: as an outsider (no token) and as a token holder.

Each attack from the trust issue is tried against real processes and must be refused with a
clear status; afterwards no process has died, the run still advances, every micro-batch is
counted once and no forged checkpoint is in the store (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys

import grpc
import pytest

from gptjt_core.dht_auth import dht_public_key, new_dht_key
from gptjt_core.pki import new_key_pem, public_key_pem
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import coordinator_pb2_grpc as cpb_grpc
from gptjt_proto import stage_pb2 as spb
from gptjt_proto import stage_pb2_grpc as spb_grpc
from tests.conftest import REPO
from tests.swarm import Swarm, swarm_toml

CODES = grpc.StatusCode


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Two stages, one worker each, checkpoints every 2 steps, a long run the attacks happen during."""
    tmp = tmp_path_factory.mktemp("hostile")
    swarm = Swarm(tmp, swarm_toml(tmp, steps=400, timeout_s=10.0, checkpoint_every=2))
    try:
        swarm.start_coordinator()
        for name in ("a", "b"):
            swarm.start_worker(name)
        swarm.wait(lambda s: s["step"] >= 2 and s["checkpoints"]["latest_complete"], 240, "two steps, a checkpoint")
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def stub(swarm):
    with grpc.insecure_channel(swarm.address) as channel:
        yield cpb_grpc.CoordinatorStub(channel)


@pytest.fixture(scope="module")
def victim(swarm) -> dict:
    return next(w for w in swarm.status()["workers"] if w["stage"] == 1)


@pytest.fixture(scope="module")
def holder(swarm, stub):
    """A token holder: a raw client that joined with the run's token (its own session and cert)."""
    return join_raw(swarm, stub, "mallory")


def join_raw(swarm, stub, name: str) -> dict:
    key = new_key_pem()
    reply = stub.Join(cpb.JoinRequest(token=swarm.token, name=name, address="127.0.0.1:9",
                                      public_key_pem=public_key_pem(key).decode()), timeout=10)
    assert reply.assignment.stage == -1  # both stages are held: it waits on standby
    session = (("gptjt-worker", reply.worker_id), ("gptjt-session", reply.session))
    return {"id": reply.worker_id, "session": session, "key": key, "reply": reply}


def keep_alive(stub, holder) -> None:
    """The raw token holder heartbeats like a worker, so its session lives through the test."""
    stub.Heartbeat(cpb.HeartbeatRequest(worker_id=holder["id"], state=cpb.STANDBY), timeout=10,
                   metadata=holder["session"])


def refused(call, *args, code: grpc.StatusCode, words: str = "", **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)  # a streamed reply raises as it is read
    assert err.value.code() == code, (err.value.code(), err.value.details())
    assert words in (err.value.details() or ""), err.value.details()
    return err.value.details()


def worker_requests(worker_id: str) -> dict:
    """One request of every worker call, in `worker_id`'s name."""
    return {
        "Heartbeat": cpb.HeartbeatRequest(worker_id=worker_id, state=cpb.READY),
        "Leave": cpb.LeaveRequest(worker_id=worker_id),
        "LeaseTickets": cpb.LeaseRequest(worker_id=worker_id, max_tickets=1),
        "CommitTicket": cpb.CommitRequest(worker_id=worker_id, ticket_id=1, attempt=0, loss=1.0, tokens=1),
        "ReleaseTickets": cpb.ReleaseRequest(worker_id=worker_id, ticket_ids=[1]),
        "ReportStep": cpb.StepReport(worker_id=worker_id, step=0, kind=cpb.CONTRIBUTION, grad_norm_sq=1.0),
        "ReportPeerFailure": cpb.PeerFailure(worker_id=worker_id, address="127.0.0.1:1", reason="x"),
        "ReportCheck": cpb.CheckReport(worker_id=worker_id, check_id=1, unable="x"),
    }


def test_an_outsider_cannot_act_for_a_worker(stub, victim):
    for method, request in worker_requests(victim["id"]).items():
        refused(getattr(stub, method), request, timeout=10, code=CODES.UNAUTHENTICATED, words="no valid session")
    refused(stub.Heartbeats, iter([cpb.HeartbeatRequest(worker_id=victim["id"], state=cpb.READY)]), timeout=10,
            code=CODES.UNAUTHENTICATED, words="no valid session")
    refused(stub.Watch, cpb.WatchRequest(worker_id=victim["id"]), timeout=10, code=CODES.UNAUTHENTICATED)
    refused(stub.GetCheckpoint, cpb.GetCheckpointRequest(step=0, start_layer=0, end_layer=2, embed=True), timeout=10,
            code=CODES.UNAUTHENTICATED)
    refused(stub.Join, cpb.JoinRequest(token="", name="x", address="127.0.0.1:1", worker_id=victim["id"]), timeout=10,
            code=CODES.UNAUTHENTICATED, words="gptjt token create")


def test_a_token_holder_cannot_act_for_another_or_take_its_id(swarm, stub, victim, holder):
    keep_alive(stub, holder)
    for method, request in worker_requests(victim["id"]).items():
        refused(getattr(stub, method), request, timeout=10, metadata=holder["session"], code=CODES.PERMISSION_DENIED,
                words="acts only in its own name")
    # on the heartbeat stream each message is checked: one in its own name, then one in the victim's
    beats = [cpb.HeartbeatRequest(worker_id=w, state=cpb.STANDBY) for w in (holder["id"], victim["id"])]
    refused(stub.Heartbeats, iter(beats), timeout=10, metadata=holder["session"], code=CODES.PERMISSION_DENIED,
            words="acts only in its own name")
    refused(stub.Join, cpb.JoinRequest(token=swarm.token, name="x", address="127.0.0.1:1", worker_id=victim["id"]),
            timeout=10, code=CODES.ALREADY_EXISTS, words="is taken")
    # a forged session: the holder's secret under the victim's id
    forged = (("gptjt-worker", victim["id"]), holder["session"][1])
    refused(stub.Leave, cpb.LeaveRequest(worker_id=victim["id"]), timeout=10, metadata=forged,
            code=CODES.UNAUTHENTICATED)


def test_a_heartbeat_stream_ends_with_its_session(swarm, stub):
    """A session checked when the stream opened is checked again for each message: after the
    worker left, its open stream's next beat is refused as an unsessioned call would be."""
    joiner = join_raw(swarm, stub, "trudy")
    requests: queue.Queue = queue.Queue()
    replies = stub.Heartbeats(iter(requests.get, None), timeout=30, metadata=joiner["session"])
    beat = cpb.HeartbeatRequest(worker_id=joiner["id"], state=cpb.STANDBY)
    try:
        requests.put(beat)
        assert next(replies).known
        stub.Leave(cpb.LeaveRequest(worker_id=joiner["id"]), timeout=10, metadata=joiner["session"])
        requests.put(beat)
        refused(lambda: next(replies), code=CODES.UNAUTHENTICATED, words="no valid session")
    finally:
        requests.put(None)
        replies.cancel()


def checkpoint_chunks(worker_id: str, step: int, start: int, end: int, blob: bytes, nbytes: int | None = None,
                      digest: str | None = None):
    header = cpb.CheckpointHeader(worker_id=worker_id, step=step, start_layer=start, end_layer=end,
                                  embed=start == 0, head=True, nbytes=len(blob) if nbytes is None else nbytes,
                                  sha256=digest if digest is not None else hashlib.sha256(blob).hexdigest())
    yield cpb.CheckpointChunk(header=header)
    yield cpb.CheckpointChunk(data=blob)


def test_no_forged_checkpoint_reaches_the_store(swarm, stub, holder):
    keep_alive(stub, holder)
    before = swarm.status()["checkpoints"]
    blob = os.urandom(1024)
    # the outsider
    refused(stub.PutCheckpoint, checkpoint_chunks("", 10_000, 0, 999, blob), timeout=10, code=CODES.UNAUTHENTICATED)
    # the token holder on standby: a step past the run's end and layers the model has not are refused
    # at the door; the whole model at a step to come, as itself, because it holds no stage
    refused(stub.PutCheckpoint, checkpoint_chunks(holder["id"], 10_000, 0, 999, blob), timeout=10,
            metadata=holder["session"], code=CODES.OUT_OF_RANGE, words="train.steps")
    now = swarm.status()
    n_layer, step = now["stages"][-1]["end_layer"], now["step"]
    refused(stub.PutCheckpoint, checkpoint_chunks(holder["id"], step, 0, 999, blob), timeout=10,
            metadata=holder["session"], code=CODES.OUT_OF_RANGE, words="end_layer")
    refused(stub.PutCheckpoint, checkpoint_chunks(holder["id"], step + 2, 0, n_layer, blob), timeout=10,
            metadata=holder["session"], code=CODES.PERMISSION_DENIED, words="holds no stage")
    # ... and never as another worker
    refused(stub.PutCheckpoint, checkpoint_chunks("0123456789ab", step + 2, 0, n_layer, blob), timeout=10,
            metadata=holder["session"], code=CODES.PERMISSION_DENIED, words="not the session's worker")
    after = swarm.status()["checkpoints"]
    assert after["steps"] == [s for s in after["steps"] if s <= swarm.status()["step"]]
    assert set(before["steps"]) <= set(after["steps"]) or after["latest_complete"] >= before["latest_complete"]


def stage_stub(address: str, credentials=None, target: str = ""):
    if credentials is None:
        return spb_grpc.StageStub(grpc.insecure_channel(address))
    options = [("grpc.ssl_target_name_override", target)] if target else []
    return spb_grpc.StageStub(grpc.secure_channel(address, credentials, options=options))


def test_stage_links_serve_only_the_workers_placed_before_them(swarm, victim, holder):
    # an outsider: no certificate, no TLS handshake
    refused(stage_stub(victim["address"]).Probe, spb.ProbeRequest(payload=b""), timeout=10, code=CODES.UNAVAILABLE)
    refused(stage_stub(victim["address"]).FetchState, spb.FetchStateRequest(), timeout=10, code=CODES.UNAVAILABLE)
    refused(stage_stub(victim["address"]).FetchEvidence, spb.EvidenceRequest(ticket_id=1), timeout=10,
            code=CODES.UNAVAILABLE)
    # a token holder with the run's certificate: a member, but not placed before stage 1
    creds = grpc.ssl_channel_credentials(root_certificates=holder["reply"].ca_pem.encode(), private_key=holder["key"],
                                         certificate_chain=holder["reply"].cert_pem.encode())
    member = stage_stub(victim["address"], creds, f"{victim['id']}.gptjt")
    assert member.Probe(spb.ProbeRequest(payload=b"x" * 10), timeout=10).received_bytes == 10
    refused(member.FetchState, spb.FetchStateRequest(), timeout=10, code=CODES.PERMISSION_DENIED,
            words="may not copy this stage")
    refused(member.FetchEvidence, spb.EvidenceRequest(ticket_id=1), timeout=10, code=CODES.PERMISSION_DENIED,
            words="no replica of this stage")  # the bytes it received are for its replicas' spot checks only
    header = spb.MicroBatchHeader(ticket_id=1, step=swarm.status()["step"] + 1, attempt=0, global_batch=4, stage=1)
    refused(member.Process, iter([spb.StageChunk(header=header)]), timeout=10, code=CODES.PERMISSION_DENIED,
            words="not placed before this stage")
    # and the victim checks who answers: a server that is not the worker named for the address is refused
    wrong_name = stage_stub(victim["address"], creds, f"{holder['id']}.gptjt")
    refused(wrong_name.Probe, spb.ProbeRequest(payload=b""), timeout=10, code=CODES.UNAVAILABLE)


def test_random_bytes_to_every_rpc_of_every_service(swarm, victim):
    rng = random.Random(7)
    services = {
        swarm.address: [("/gptjt.Coordinator/" + m, kind) for m, kind in (
            ("Join", "uu"), ("Heartbeat", "uu"), ("Heartbeats", "ss"), ("Leave", "uu"), ("Watch", "us"), ("LeaseTickets", "uu"),
            ("CommitTicket", "uu"), ("ReleaseTickets", "uu"), ("ReportStep", "uu"), ("ReportPeerFailure", "uu"),
            ("Status", "uu"), ("PutCheckpoint", "su"), ("GetCheckpoint", "us"), ("ReportCheck", "uu"))]
        + [("/gptjt.Operator/" + m, "uu") for m in ("Drain", "SetPaused", "CreateToken", "RevokeToken", "Events",
                                                      "OperatorCertificate")],
        victim["address"]: [("/gptjt.Stage/Process", "ss"), ("/gptjt.Stage/FetchState", "us"),
                            ("/gptjt.Stage/Probe", "uu"), ("/gptjt.Stage/FetchEvidence", "uu")],
    }
    for address, methods in services.items():
        with grpc.insecure_channel(address) as channel:
            for method, kind in methods:
                for _ in range(3):
                    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
                    call = {"uu": channel.unary_unary, "us": channel.unary_stream, "su": channel.stream_unary,
                            "ss": channel.stream_stream}[kind](method)
                    arg = iter([junk]) if kind[0] == "s" else junk
                    with pytest.raises(grpc.RpcError) as err:
                        result = call(arg, timeout=10)
                        if kind[1] == "s":
                            list(result)
                    assert err.value.code() in (CODES.INVALID_ARGUMENT, CODES.INTERNAL, CODES.UNAUTHENTICATED,
                                                CODES.UNAVAILABLE, CODES.PERMISSION_DENIED), (method, err.value)


@pytest.fixture(scope="module")
def dht_run(tmp_path_factory):
    """A run with replicas: its coordinator serves the run's DHT (no worker needed for this)."""
    tmp = tmp_path_factory.mktemp("hostile-dht")
    swarm = Swarm(tmp, swarm_toml(tmp, replicas_per_stage=2, start_with_replicas=2))
    try:
        swarm.start_coordinator()
        yield swarm
    finally:
        swarm.close()


def dht_member(swarm) -> tuple[bytes, cpb.JoinReply]:
    """A token holder's DHT key and the join reply that carries the run's DHT token for it; a join
    without a DHT key, or with one the authority cannot sign, is refused in a run with replicas."""
    key, link_key = new_dht_key(), public_key_pem(new_key_pem()).decode()
    with grpc.insecure_channel(swarm.address) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        refused(stub.Join, cpb.JoinRequest(token=swarm.token, name="keyless", address="127.0.0.1:9",
                                           public_key_pem=link_key), timeout=10, code=CODES.INVALID_ARGUMENT,
                words="dht_public_key is empty")
        refused(stub.Join, cpb.JoinRequest(token=swarm.token, name="bad-key", address="127.0.0.1:9",
                                           public_key_pem=link_key, dht_public_key=b"ssh-rsa AAAAB3NzaC1yc2E="),
                timeout=10, code=CODES.INVALID_ARGUMENT, words="dht_public_key: not an OpenSSH public key")
        reply = stub.Join(cpb.JoinRequest(token=swarm.token, name="dht-member", address="127.0.0.1:9",
                                          public_key_pem=link_key, dht_public_key=dht_public_key(key)), timeout=10)
    return key, reply


def test_the_runs_dht_serves_only_run_members(dht_run, tmp_path):
    """Outsiders (a plain hivemind peer, a member of another run, a token that expired) store
    and look up records through the coordinator's DHT peer and a member's: every RPC goes
    unanswered and nothing they sent is held, while the member's own store and find work."""
    key, reply = dht_member(dht_run)
    authority_file = f"{dht_run.ledger_path}.dht-authority.der"
    assert os.stat(authority_file).st_mode & 0o777 == 0o600
    token = reply.dht_token
    assert token.username == reply.worker_id and token.public_key == dht_public_key(key)
    assert reply.dht_authority_key == dht_public_key(open(authority_file, "rb").read())
    setup = tmp_path / "setup.json"
    setup.write_text(json.dumps({
        "key": key.hex(), "authority_key": reply.dht_authority_key.hex(), "authority_key_file": authority_file,
        "coordinator_maddrs": list(reply.dht_peers),
        "token": {"username": token.username, "public_key": token.public_key.hex(),
                  "expiration_time": token.expiration_time, "signature": token.signature.hex()}}))
    log = tmp_path / "dht_intruder.log"
    peers = subprocess.Popen([sys.executable, "-m", "tests.integration.dht_intruder", str(setup)], cwd=REPO,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert peers.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:  # the process group takes the peers' p2pd daemons along
        try:
            os.killpg(peers.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    report = json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1])
    assert report["member"] == {"store_at_coordinator": [True], "find_at_coordinator": "found", "get": True}
    for kind in ("none", "foreign", "expired"):
        assert report[kind] == {"store_at_coordinator": None, "find_at_coordinator": None, "store_at_member": None,
                                "find_at_member": None, "get": False, "held_by_member": False,
                                "member_finds_at_coordinator": "not found"}, (kind, report[kind])


def test_text_a_worker_sends_cannot_forge_a_coordinator_log_line(swarm, stub, victim):
    """A peer-failure reason may hold an exception's newlines, so it is not refused (an honest
    worker's report is kept); it reaches the coordinator's log escaped onto one line."""
    holder = join_raw(swarm, stub, "eve")  # mallory has been silent past the heartbeat timeout by now
    forged = "timed out\nWARNING coordinator: worker zz forged this line\x1b[2K"
    reply = stub.ReportPeerFailure(cpb.PeerFailure(worker_id=holder["id"], address=victim["address"], reason=forged),
                                   timeout=10, metadata=holder["session"])
    assert not reply.declared_dead  # the victim accepts connections: only logged
    log = swarm.workdir / "coordinator-1.log"
    swarm.wait(lambda s: "forged this line" in log.read_text(), 10, "the report in the coordinator's log")
    lines = log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("WARNING coordinator: worker zz")]
    assert [line for line in lines if "(timed out\\nWARNING coordinator: worker zz forged this line\\x1b[2K)" in line]


def test_the_run_survived_every_attack(swarm):
    """Last in this module: nothing died, the run still advances, and counts hold."""
    step = swarm.status()["step"]
    status = swarm.wait(lambda s: s["step"] >= step + 2, 180, "two more steps after the attacks")
    assert all(p.alive for p in swarm.procs)
    assert sorted(w["name"] for w in status["workers"] if w["state"] == "ready") == ["a", "b"]
    t = status["tickets"]
    assert (t["lost"], t["double"], t["exactly_once_violations"]) == (0, 0, [])
    for stored in status["checkpoints"]["steps"]:  # nothing from the future, nothing forged
        assert stored <= status["step"] + 1
    assert status["checkpoints"]["latest_complete"] is not None
