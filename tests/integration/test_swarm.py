"""The swarm with real processes on loopback: equivalence with train-local, faults, bad input."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest
import torch

from gptjt_core.codec_sizes import codec_nbytes
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import coordinator_pb2_grpc as cpb_grpc
from tests.swarm import Swarm, free_port, local_losses, swarm_toml


@pytest.fixture()
def swarm_factory(tmp_path):
    swarms = []

    def make(**kw) -> Swarm:
        s = Swarm(tmp_path, swarm_toml(tmp_path, **kw))
        swarms.append(s)
        return s

    yield make
    for s in swarms:
        s.close()


def done(s: dict) -> bool:
    return s["phase"] == "done"


def test_two_stage_swarm_reproduces_train_local(swarm_factory, tmp_path):
    swarm = swarm_factory(steps=3)
    coordinator = swarm.start_coordinator()
    assert coordinator.text().startswith("gptjt-coordinator: run 'test-swarm' listening on 127.0.0.1:")
    w0, w1 = swarm.start_worker("w0"), swarm.start_worker("w1")
    firsts = [w.wait_for("gptjt-worker: joined").splitlines()[0] for w in (w0, w1)]
    assert all(line.startswith(f"gptjt-worker: joined {swarm.address} as ") for line in firsts)
    assert sorted(line.split(", ")[1].split(";")[0] for line in firsts) == [
        "stage 0 of 2 (layers 0-2)", "stage 1 of 2 (layers 2-4)"]
    status = swarm.wait(done, 180, "the run to finish")

    expected, local_state = local_losses(swarm.config, 3)
    got = [h["loss"] for h in status["history"]]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert status["tickets"] == {"issued": 6, "committed": 6, "reissued": 0, "leased": 0, "pending": 0,
                                 "aborted": 0, "rolled_back": 0, "lost": 0, "double": 0,
                                 "exactly_once_violations": []}
    assert status["tokens"] == 3 * 4 * 64 and status["step"] == 3
    assert {w["stage"] for w in status["workers"]} == {0, 1}
    assert all(w["metrics"]["bytes_sent"] > 0 for w in status["workers"])

    from gptjt_cli.swarm_commands import export_from_swarm
    from safetensors.torch import load_file

    out = export_from_swarm(swarm.address, str(tmp_path / "export"), admin_token=swarm.admin_token)
    exported = load_file(f"{out}/model.safetensors")
    assert set(exported) == set(local_state)
    assert max(float((exported[k] - local_state[k]).abs().max()) for k in exported) < 1e-4


def test_worker_sigkill_mid_step_then_replacement(swarm_factory):
    swarm = swarm_factory(steps=4, global_batch=8, micro_batch=2)
    swarm.start_coordinator()
    workers = {"w0": swarm.start_worker("w0"), "w1": swarm.start_worker("w1")}
    status = swarm.wait(lambda s: s["step"] >= 1 and s["phase"] == "open" and s["tickets"]["committed"] > 4 + 1,
                        120, "step 1 under way")
    victim = workers[next(w["name"] for w in status["workers"] if w["stage"] == 1)]
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    status = swarm.wait(lambda s: any(w["state"] == "dead" for w in s["workers"]), 30, "the victim declared dead")
    assert time.monotonic() - killed_at < 3.0 + 5.0  # heartbeat timeout (3 s) + reaper and polling slack
    assert status["phase"] == "waiting" and status["stages"][1]["workers"] == []
    swarm.start_worker("w2")
    status = swarm.wait(done, 180, "the run to finish after the replacement joined")
    assert status["tickets"]["exactly_once_violations"] == []
    assert status["tickets"]["rolled_back"] >= 2
    assert [h["step"] for h in status["history"]] == [0, 1, 2, 3]
    kinds = [e["kind"] for e in status["events"]]
    assert "worker_dead" in kinds and "rolled_back" in kinds
    # No checkpoint existed: every stage went back to the initial weights and re-ran the
    # steps on the same data, so the run is still exactly train-local's.
    expected, _ = local_losses(swarm.config, 4)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_a_worker_declared_dead_after_a_stall_joins_again(swarm_factory):
    """A worker frozen past the heartbeat timeout (SIGSTOP: a stalled host, a partition) is
    declared dead and its stage rolled back; once it runs again it learns that, joins again as
    a new worker under the same name, takes the vacant stage, and the run ends on the
    train-local curve."""
    # 10 steps: a tiny step takes well under a second, and the status the test polls lags by up
    # to a second or two; with 4 steps CI once froze w1 after the run had already finished
    swarm = swarm_factory(steps=10)
    swarm.start_coordinator()
    workers = {"w0": swarm.start_worker("w0"), "w1": swarm.start_worker("w1")}
    swarm.wait(lambda s: s["step"] >= 1, 120, "step 1")
    workers["w1"].kill(signal.SIGSTOP)
    status = swarm.wait(lambda s: any(w["name"] == "w1" and w["state"] == "dead" for w in s["workers"]), 30,
                        "the frozen worker declared dead")
    assert status["phase"] != "done", f"the run finished before w1 froze (step {status['step']}): nothing to test"
    first_id = next(w["id"] for w in status["workers"] if w["name"] == "w1")
    workers["w1"].kill(signal.SIGCONT)
    workers["w1"].wait_for(f"gptjt-worker: {first_id} was declared dead by the coordinator; joining again", 30)
    status = swarm.wait(done, 180, "the run to finish after the re-join")
    w1s = [w for w in status["workers"] if w["name"] == "w1"]
    assert [w["id"] == first_id for w in w1s].count(True) == 1 and len(w1s) == 2
    assert next(w for w in w1s if w["id"] != first_id)["state"] != "dead"
    assert workers["w1"].p.poll() in (None, 0)  # still a member, or left cleanly at the end
    assert status["tickets"]["exactly_once_violations"] == []
    expected, _ = local_losses(swarm.config, 10)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_a_last_replica_drained_mid_step_saves_its_stage_instead_of_rolling_back(swarm_factory, tmp_path):
    """The operator pauses a run without checkpoints mid-step, then drains the only worker of
    stage 1: it leaves at once (a paused run closes no step), leaving the weights the open step
    started from in the store, so a newcomer redoes only that step: no rollback, and the run
    ends on the train-local curve."""
    # 8 micro-batches a step, at most 3 in flight: a pause leaves the open step unfinished
    swarm = swarm_factory(steps=4, global_batch=8, micro_batch=1)
    swarm.start_coordinator()
    workers = {"w0": swarm.start_worker("w0"), "w1": swarm.start_worker("w1")}
    swarm.wait(lambda s: s["step"] >= 2, 120, "two steps")
    swarm.operate("pause")
    # what was in flight when the pause came finishes; then nothing moves
    status = swarm.wait(lambda s: s["phase"] == "open" and s["tickets"]["leased"] == 0, 60, "the paused run to settle")
    paused_at = status["step"]
    victim = next(w["name"] for w in status["workers"] if w["stage"] == 1)
    swarm.operate("drain", victim)
    drained = time.monotonic()
    assert workers[victim].p.wait(30) == 0
    assert time.monotonic() - drained < 20  # not the 60 s drain timeout
    assert "checkpointed stage" in workers[victim].text()
    status = swarm.status()
    assert status["step"] == paused_at and paused_at in status["checkpoints"]["steps"]
    assert "rolled_back" not in [e["kind"] for e in status["events"]]
    swarm.start_worker("w2")
    swarm.operate("resume")
    status = swarm.wait(done, 180, "the run to finish after the replacement joined")
    assert status["tickets"]["exactly_once_violations"] == [] and status["tickets"]["rolled_back"] == 0
    assert "from the checkpoint store" in (tmp_path / "worker-w2.log").read_text()
    expected, _ = local_losses(swarm.config, 4)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_coordinator_kill9_and_restart_loses_nothing(swarm_factory):
    port = free_port()
    swarm = swarm_factory(steps=5, port=port, timeout_s=6.0)
    coordinator = swarm.start_coordinator()
    swarm.start_worker("w0")
    swarm.start_worker("w1")
    swarm.wait(lambda s: s["step"] >= 2, 120, "two steps")
    coordinator.kill(signal.SIGKILL)
    coordinator.p.wait(5)
    time.sleep(1.0)
    swarm.start_coordinator()
    status = swarm.wait(done, 180, "the run to finish after the restart")
    expected, _ = local_losses(swarm.config, 5)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert status["tickets"]["exactly_once_violations"] == []
    assert status["tickets"]["committed"] == 5 * 2  # 5 steps x (4 sequences / 2 per ticket)
    assert "coordinator_restarted" in [e["kind"] for e in status["events"]]
    assert all(w["state"] == "ready" for w in status["workers"])  # nobody was declared dead


def test_join_with_wrong_or_missing_token_is_refused(swarm_factory):
    swarm = swarm_factory(steps=1)
    swarm.start_coordinator()
    before = swarm.status()
    with grpc.insecure_channel(swarm.address) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        for token in ("", "gptjt_wrong", swarm.token + "x"):
            with pytest.raises(grpc.RpcError) as err:
                stub.Join(cpb.JoinRequest(token=token, name="intruder", address="127.0.0.1:1"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "gptjt token create" in err.value.details()
    worker = swarm.start_worker("intruder", token="gptjt_nope")
    assert worker.p.wait(60) == 3
    assert "refused the join: bad or missing run token" in worker.text()
    after = swarm.status()
    assert after["workers"] == before["workers"] == []
    assert swarm.token not in (swarm.workdir / "coordinator-1.log").read_text()


def test_duplicate_commit_is_counted_once(swarm_factory):
    swarm = swarm_factory(steps=1, num_stages=1, global_batch=2, micro_batch=2,
                          extra='[link]\ntls = "off"')  # a raw client: no stage-link key
    swarm.start_coordinator()
    with grpc.insecure_channel(swarm.address) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        join = stub.Join(cpb.JoinRequest(token=swarm.token, name="raw", address="127.0.0.1:1"), timeout=10)
        assert join.assignment.stage == 0 and join.assignment.head and join.assignment.embed
        session = (("gptjt-worker", join.worker_id), ("gptjt-session", join.session))
        stub.Heartbeat(cpb.HeartbeatRequest(worker_id=join.worker_id, state=cpb.READY), timeout=10, metadata=session)
        # one stage: at most 2 micro-batches in flight (pipeline.in_flight), so at most 2 per lease
        lease = stub.LeaseTickets(cpb.LeaseRequest(worker_id=join.worker_id, max_tickets=2), timeout=10,
                                  metadata=session)
        assert len(lease.tickets) == 1
        t = lease.tickets[0]
        request = cpb.CommitRequest(worker_id=join.worker_id, ticket_id=t.ticket_id, attempt=t.attempt,
                                    loss=1.5, tokens=128)
        assert stub.CommitTicket(request, timeout=10, metadata=session).result == cpb.COMMITTED
        assert stub.CommitTicket(request, timeout=10, metadata=session).result == cpb.ALREADY_COMMITTED
        stale = cpb.CommitRequest(worker_id=join.worker_id, ticket_id=t.ticket_id, attempt=t.attempt + 1)
        assert stub.CommitTicket(stale, timeout=10, metadata=session).result == cpb.ALREADY_COMMITTED
        assert stub.CommitTicket(cpb.CommitRequest(worker_id=join.worker_id, ticket_id=999), timeout=10,
                                 metadata=session).result == cpb.NOT_LEASED
        # another worker's name: refused at the door (a session acts only as its own worker)
        with pytest.raises(grpc.RpcError) as err:
            stub.CommitTicket(cpb.CommitRequest(worker_id="0123456789ab", ticket_id=999), timeout=10, metadata=session)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # read the ledger before this raw worker times out (that would restart the step)
        status = json.loads(stub.Status(cpb.StatusRequest(), timeout=10).json)
    assert status["tickets"]["committed"] == 1 and status["phase"] == "accumulated"


def test_sigterm_drains_at_a_step_boundary(swarm_factory):
    """The last stage's worker leaves, the harder case: stage 0's worker leases micro-batches the
    moment a step opens, so the coordinator must know of the drain before the step boundary (the
    worker announces it and waits for the acknowledgement) or the next step opens with the leaver
    as its member and its leave restarts that step."""
    swarm = swarm_factory(steps=30)
    swarm.start_coordinator()
    workers = {name: swarm.start_worker(name) for name in ("w0", "w1")}
    status = swarm.wait(lambda s: s["step"] >= 1, 120, "a step")
    leaver = workers[next(w["name"] for w in status["workers"] if w["stage"] == 1)]
    leaver.kill(signal.SIGTERM)
    assert leaver.p.wait(60) == 0
    assert "left the run" in leaver.text()
    status = swarm.status()
    assert status["tickets"]["leased"] == 0
    assert "worker_left" in [e["kind"] for e in status["events"]]
    restarts = [e["detail"] for e in status["events"] if e["kind"] == "step_restarted"]
    assert restarts == [], "it left between steps, yet a step was re-run"


def test_bad_stage_messages_are_refused_and_the_worker_keeps_serving(swarm_factory):
    """Wrong shape, dtype, NaN, truncated or oversized payloads get clear errors; a good one still works."""
    import numpy as np

    from gptjt_core.compression import encode
    from gptjt_proto import stage_pb2 as spb
    from gptjt_proto import stage_pb2_grpc as spb_grpc
    from worker.wire import data_chunks, meta_pb

    # A paused run holds step 0 open, so a well-formed micro-batch of it is one stage 1 works on;
    # plaintext links, so this raw client needs no certificate (mTLS has its own tests: test_hostile.py).
    swarm = swarm_factory(steps=5, extra='[link]\ntls = "off"')
    swarm.start_coordinator()
    swarm.operate("pause")  # raises, with the CLI's stderr, when the pause fails
    swarm.start_worker("w0")
    swarm.start_worker("w1")
    status = swarm.wait(lambda s: [w["state"] for w in s["workers"]] == ["ready", "ready"], 120,
                        "two ready stage workers")
    last = next(w for w in status["workers"] if w["stage"] == 1)
    B, T, D = 1, 16, 128
    labels = np.full((B, T), 7, dtype="<u2").tobytes()  # worker/label_wire.py: 2 bytes a label

    def send(tensor=None, codec="fp32", header_overrides=None, data=None):
        enc = encode(tensor if tensor is not None else torch.randn(B, T, D), codec)
        meta = meta_pb(enc)
        header = spb.MicroBatchHeader(ticket_id=1, step=status["step"], attempt=status["attempt"], global_batch=4,
                                      prefix_lengths=[3],
                                      labels=labels, activations=meta, stage=1)
        for k, v in (header_overrides or {}).items():
            if k == "nbytes":
                header.activations.nbytes = v
            elif k == "prefix_lengths":
                header.prefix_lengths[:] = v
            else:
                setattr(header, k, v)
        payload = enc.data if data is None else data

        def chunks():
            yield spb.StageChunk(header=header)
            yield from data_chunks(payload, 1 << 16)

        with grpc.insecure_channel(last["address"]) as channel:
            return list(spb_grpc.StageStub(channel).Process(chunks(), timeout=30))

    cases = [
        (dict(tensor=torch.randn(B, T, 64)), grpc.StatusCode.INVALID_ARGUMENT, "takes (B, T, 128)"),
        (dict(tensor=torch.randn(B, T, D).to(torch.float64)), grpc.StatusCode.INVALID_ARGUMENT, "float64"),
        (dict(tensor=torch.full((B, T, D), float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf"),
        (dict(data=encode(torch.randn(B, T, D), "fp32").data[:-8]), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (dict(header_overrides={"nbytes": 1 << 40}), grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds this stage's limit"),
        (dict(header_overrides={"stage": 0}), grpc.StatusCode.FAILED_PRECONDITION, "holding stage 1"),
        (dict(header_overrides={"prefix_lengths": [99]}), grpc.StatusCode.INVALID_ARGUMENT, "prefix lengths"),
        (dict(header_overrides={"global_batch": 0}), grpc.StatusCode.INVALID_ARGUMENT, "micro_batch.global_batch = 0"),
        (dict(header_overrides={"gradient_codec": "zip"}), grpc.StatusCode.INVALID_ARGUMENT, "gradient_codec"),
        (dict(tensor=torch.randn(B, 65, D)), grpc.StatusCode.OUT_OF_RANGE, "train.seq_len"),  # the (B,1,T,T) mask
        (dict(tensor=torch.randn(3, T, D)), grpc.StatusCode.OUT_OF_RANGE, "train.micro_batch"),
        (dict(header_overrides={"labels": np.full((B, T), 50400, dtype="<u2").tobytes()}),
         grpc.StatusCode.INVALID_ARGUMENT, "[0, 50400) or -100"),  # a device-side assert on a GPU
        (dict(header_overrides={"labels": np.full((B, T), 7, dtype="<i8").tobytes()}),
         grpc.StatusCode.INVALID_ARGUMENT, "2 or 4 bytes each"),  # the int64 labels of before 2026-12-05
    ]
    for kwargs, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            send(**kwargs)
        assert err.value.code() == code, (kwargs.keys(), err.value.details())
        assert words in err.value.details()
    # still serving: a well-formed micro-batch of the open step gets its gradient back
    reply = send()
    assert reply[0].WhichOneof("part") == "reply" and reply[0].reply.gradient.shape == [B, T, D]
    assert sum(len(c.data) for c in reply[1:]) == B * T * D * 4
    with pytest.raises(grpc.RpcError) as err:  # and one of a step not open is refused
        send(header_overrides={"step": status["step"] + 3})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "the open step is" in err.value.details()
    for proc in swarm.procs[1:]:
        proc.kill()  # a paused run's workers would wait out their drain timeout


def test_quantized_codecs_cut_link_bytes_and_stay_on_the_curve(swarm_factory):
    """q4 activations forward, q8 gradients back: the same run with ~2.6x fewer boundary
    bytes than fp16 (~5x fewer than fp32), and losses within a percent of train-local."""
    swarm = swarm_factory(steps=3)
    swarm.config.write_text(swarm.config.read_text().replace('activation_codec = "fp32"', 'activation_codec = "q4"')
                            .replace('gradient_codec = "fp32"', 'gradient_codec = "q8"'))
    swarm.start_coordinator()
    swarm.start_worker("w0"), swarm.start_worker("w1")
    status = swarm.wait(done, 180, "the run to finish")
    expected, _ = local_losses(swarm.config, 3)
    got = [h["loss"] for h in status["history"]]
    assert got[0] == pytest.approx(expected[0], rel=2e-3)  # step 0: only the forward's rounding
    assert got == pytest.approx(expected, rel=1e-2)
    sent = sum(w["metrics"]["bytes_sent"] for w in status["workers"])
    fp32_bytes = 2 * 3 * 2 * (2 * 64 * 128 * 4)  # forward + backward, 3 steps x 2 micro-batches
    assert 0 < sent < fp32_bytes / 4


# An emulated 20 Mbit/s, 5 ms link between the stages; slow below 200 Mbit/s
SLOW_LINK = """
[link]
adaptive_codecs = true
slow_link_mbit = 200.0
slow_activation_codec = "q4"
slow_gradient_codec = "q8"
emulate_mbit = 20.0
emulate_latency_ms = 5.0
"""


def test_a_slow_link_is_measured_and_switched_to_fewer_bits(swarm_factory):
    """An emulated 20 Mbit/s, 5 ms link between the stages: stage 0 measures it (never faster
    than the shaper lets bytes through), switches that link to the slow codecs, says so in its
    heartbeat metrics, and the run still follows train-local's losses."""
    swarm = swarm_factory(steps=4, extra=SLOW_LINK)
    swarm.start_coordinator()
    swarm.start_worker("w0"), swarm.start_worker("w1")
    swarm.wait(done, 180, "the run to finish")

    def first_stage(s: dict) -> dict:
        return next(w for w in s["workers"] if w["stage"] == 0)["metrics"]

    # the metrics come with heartbeats (every 0.5 s here, and one when the run is done)
    status = swarm.wait(lambda s: first_stage(s).get("downstream_mbit", 0) > 0, 10, "stage 0's link metrics")
    first = first_stage(status)
    assert 0 < first["downstream_mbit"] <= 20.0 * 1.02
    assert (first["activation_codec"], first["gradient_codec"]) == ("q4", "q8")
    expected, _ = local_losses(swarm.config, 4)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=2e-2)
    # Step 0 went out in fp32 (even placement asks for no probe: an unmeasured link), the rest in
    # q4 / q8: well under all-fp32 bytes.
    sent = sum(w["metrics"]["bytes_sent"] for w in status["workers"])
    fp32_bytes = 2 * 4 * 2 * (2 * 64 * 128 * 4)
    assert 0 < sent < fp32_bytes / 2


def test_a_link_the_probe_found_slow_carries_its_first_micro_batch_in_fewer_bits(swarm_factory):
    """With cost-model placement the coordinator asks each worker to probe its links. The run is
    paused before the workers join, so no micro-batch has crossed the emulated 20 Mbit/s link when
    stage 0 reports the probe's figure and the slow codecs; after the resume, every micro-batch
    travels in them, the first included: stage 0 sent exactly q4 activations, stage 1 exactly
    q8 gradients."""
    swarm = swarm_factory(steps=3, placement="cost-model", min_workers=2, extra=SLOW_LINK)
    swarm.start_coordinator()
    swarm.operate("pause")
    swarm.start_worker("w0"), swarm.start_worker("w1")

    def stage(s: dict, i: int) -> dict:
        return next((w["metrics"] for w in s["workers"] if w["stage"] == i), {})

    status = swarm.wait(lambda s: stage(s, 0).get("downstream_mbit", 0) > 0, 60, "stage 0's probe of its link")
    first = stage(status, 0)
    assert status["tickets"]["issued"] == 0 and first["bytes_sent"] == 0  # nothing crossed the link yet
    # The probe's bandwidth, latency out: the emulated 20 Mbit/s to within timer noise (20.56 seen
    # on loaded cores)
    assert first["downstream_mbit"] == pytest.approx(20.0, rel=0.1)
    assert (first["activation_codec"], first["gradient_codec"]) == ("q4", "q8")
    swarm.operate("resume")
    swarm.wait(done, 180, "the run to finish")
    status = swarm.wait(lambda s: min(stage(s, 0).get("micro_batches", 0), stage(s, 1).get("micro_batches", 0)) >= 6,
                        10, "the last heartbeats' metrics")
    # Every message in the slow codec: the bytes are a whole number of q4 (q8) messages (fp32's
    # 65,536 bytes would take 33 (65) fp32 messages among them to keep that so), and at least one
    # per micro-batch done (a call that failed and went again counts its bytes, not a micro-batch).
    activations = 2 * 64 * 128  # values of one (2, 64) micro-batch at the tiny flavour's width
    for metrics, codec in ((stage(status, 0), "q4"), (stage(status, 1), "q8")):
        size = codec_nbytes(activations, codec)
        assert metrics["bytes_sent"] % size == 0 and metrics["bytes_sent"] >= metrics["micro_batches"] * size, (
            codec, metrics)
    expected, _ = local_losses(swarm.config, 3)
    assert [h["loss"] for h in status["history"]] == pytest.approx(expected, rel=2e-2)
