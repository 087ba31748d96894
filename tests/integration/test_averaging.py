"""hivemind gradient summation across a stage's replicas (real processes, loopback DHT of run members only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from gptjt_core.dht_auth import new_dht_key
from tests.conftest import REPO
from tests.integration.averaging_peer import LATE_S


def run_group(tmp_path, members: list[tuple[str, float, int]], compression: str = "none",
              timeout_s: float = 20.0, stall_s: float = 0.0, step_members: str = "") -> dict[str, dict]:
    """step_members: the worker ids (roles) the coordinator made members of the step, comma-separated
    ("": no membership check)."""
    procs = []
    (tmp_path / "authority.der").write_bytes(new_dht_key())  # the peers' DHT admits holders of its tokens
    total = sum(mb for _, _, mb in members)  # micro-batches in the step, the vanished peer's included
    for role, value, micro_batches in members:
        # Output goes to files, not pipes: a vanished peer's orphaned p2pd daemon would hold a
        # pipe open forever.
        log = tmp_path / f"{role}.log"
        procs.append((log, subprocess.Popen(
            [sys.executable, "-m", "tests.integration.averaging_peer", role, str(tmp_path), str(value),
             str(micro_batches), compression, str(len(members)), str(total), str(timeout_s), str(stall_s),
             step_members],
            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)))
    out = {}
    try:
        for log, p in procs:
            code = p.wait(timeout=120)
            lines = log.read_text().strip().splitlines()
            assert code == 0, "\n".join(lines[-30:])
            line = json.loads([ln for ln in lines if ln.startswith("{")][-1])  # shutdown may log after it
            out[line["role"]] = line
    finally:
        for _, p in procs:  # the process group takes any p2pd daemon with it
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return out


def test_replicas_sum_their_gradients(tmp_path):
    # gradients 1.0 (over 2 micro-batches) and 3.0 (over 6): the stage's gradient is their sum,
    # 4.0. Alone, the first would have rescaled its own to 1.0 / 2 * 8 = 4.0 as well, so the
    # group size and weight are what prove the round happened.
    res = run_group(tmp_path, [("first", 1.0, 2), ("second", 3.0, 6)])
    numel = 64 * 33 + 17
    for r in res.values():
        assert r["summed"] and r["group"] == 2 and r["weight"] == 8
        assert r["g0"] == pytest.approx(4.0) and r["g1"] == pytest.approx(-4.0)
        # Each of two peers sends the other its half (float64) and gets back the averaged half:
        # about numel * 8 bytes out, plus message framing.
        assert numel * 8 <= r["bytes_sent"] < numel * 8 * 1.2


def test_a_round_that_lost_parts_fails_and_is_retried(tmp_path):
    """A peer whose parts arrive after the reducers' sender timeout (timeout_s / 2): hivemind
    averages that part without it on one side and keeps the stalled peer's own values on the
    other, and calls the round a success. Both sides must see it failed (no replica may take
    the partial sum, 6.0 or 2.0 here) and the retried round must give both the true sum."""
    res = run_group(tmp_path, [("first", 1.0, 2), ("stalled", 3.0, 6)], timeout_s=6.0, stall_s=4.5)
    for r in res.values():
        assert r["summed"] and r["group"] == 2 and r["weight"] == 8
        assert r["rounds"] >= 2, f"{r['role']} took the partial first round as a success: {r}"
        # The first and the last element sit in different reducers' parts.
        assert r["g0"] == 4.0 and r["g_last"] == 4.0 and r["g1"] == -4.0
    # A partial round names its group (the worker then does not count it toward rebuilding its
    # averager: the peers reach each other); the stalled side's first round may instead raise.
    partial = [size for r in res.values() for size, detail in r["failed_groups"] if detail.startswith("partial")]
    assert partial and set(partial) == {2}, [r["failed_groups"] for r in res.values()]


def test_unequal_shares(tmp_path):
    # 1.0 over 2 and 3.0 over 2: the sum is 4.0 (alone they would claim 4.0 and 12.0)
    res = run_group(tmp_path, [("first", 1.0, 2), ("second", 3.0, 2)])
    for r in res.values():
        assert r["group"] == 2 and r["g0"] == pytest.approx(4.0)


@pytest.mark.parametrize("compression, rel", [("fp16", 1e-3), ("8bit-blockwise", 2e-2)])
def test_lossy_compression_stays_close(tmp_path, compression, rel):
    res = run_group(tmp_path, [("first", 1.0, 4), ("second", 3.0, 4)], compression=compression)
    numel = 64 * 33 + 17
    for r in res.values():
        assert r["summed"] and r["group"] == 2 and r["g0"] == pytest.approx(4.0, rel=rel)
        # vs float64 (8 bytes a value): fp16 is 2 bytes; 8-bit is 1 byte plus, per message, its
        # 256-entry float32 codebook, which dominates for tensors this small
        assert 0 < r["bytes_sent"] < numel * (2.6 if compression == "fp16" else 8 / 3)


DROP_S = 2.0  # after every peer is ready: the coordinator declares the vanished member dead


def _drop_after_ready(tmp_path, members: int, delay_s: float) -> None:
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < members and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay_s)
    (tmp_path / "dropped").write_text("")


def test_a_late_member_is_waited_for(tmp_path):
    """Three members, one still busy past the others' matchmaking time: the two punctual ones do
    not start without it (their sum would leave out its micro-batches, and the step would stall:
    seen on loaded cores, 2026-12-06); the round has all three."""
    res = run_group(tmp_path, [("first", 1.0, 2), ("second", 3.0, 2), ("late", 4.0, 4)])
    for r in res.values():
        assert r["summed"] and r["group"] == 3 and r["weight"] == 8 and r["rounds"] == 1, r
        assert r["g0"] == pytest.approx(8.0)  # 1.0 + 3.0 + 4.0
    assert res["first"]["seconds"] >= LATE_S - 1.0  # it waited for the late member


def test_survivors_of_a_vanished_member_average_once_the_coordinator_drops_it(tmp_path):
    """Three members, one disappears before the round: the two survivors do not average without
    it until the step names one member fewer (the coordinator has declared the vanished one dead,
    DROP_S after the round began: here a file the test writes). Their waiting round is cancelled
    then, not left to run out its timeout, and the next one sums and rescales the sum to the full
    batch (the lost share is replaced by the survivors' mean gradient per micro-batch)."""
    timeout_s = 20.0
    drop = threading.Thread(target=_drop_after_ready, args=(tmp_path, 3, DROP_S), daemon=True)
    drop.start()
    res = run_group(tmp_path, [("first", 1.0, 2), ("second", 3.0, 2), ("vanish", 100.0, 4)], timeout_s=timeout_s)
    for r in (res["first"], res["second"]):
        assert r["summed"] and r["group"] == 2 and r["weight"] == 4, r
        assert "cancelled by the worker" in r["failed_groups"][0][1], r
        # A survivor that starts its next round before the other's cancel has landed may meet the
        # other's old round (seen 1 run in 4): the one whose round finishes refuses it (the peers
        # expected different member counts), and their next rounds have them both.
        assert all("cancelled by the worker" in why or "different member counts" in why
                   for _, why in r["failed_groups"]), r
        # the round was cancelled, not timed out; unless hivemind was past matchmaking, where it does
        # not stop for a cancel: a full CI-style run (2026-12-07) took 20.1 s once, cause not seen;
        # the reason now says where hivemind was and how long it took to end
        assert r["seconds"] < timeout_s or "s after the cancel" in r["failed_groups"][0][1], r
        # (1.0 + 3.0) / 4 micro-batches * 8 micro-batches in the step
        assert r["g0"] == pytest.approx(8.0)


def test_a_refused_replica_receives_the_sum_without_contributing(tmp_path):
    """A poisoned replica enters zeros with weight 0: its 100.0 never reaches the others, its
    4 micro-batches count as lost (estimated from the others), and it ends up identical."""
    res = run_group(tmp_path, [("first", 1.0, 2), ("second", 3.0, 2), ("refused", 100.0, 4)])
    for r in res.values():
        assert r["summed"] and r["group"] == 3 and r["weight"] == 4
        assert r["g0"] == pytest.approx(8.0)  # (1.0 + 3.0) / 4 * 8
    assert res["first"]["g0"] == res["refused"]["g0"]


def test_a_replica_without_micro_batches_adds_nothing(tmp_path):
    """A replica that no micro-batch was routed to (e.g. one that just joined) takes part with
    weight 0; the others' sum is not diluted by its zeros."""
    res = run_group(tmp_path, [("first", 1.0, 2), ("second", 3.0, 2), ("idle", 0.0, 0)])
    for r in res.values():
        assert r["summed"] and r["group"] == 3 and r["weight"] == 4
        assert r["g0"] == pytest.approx(4.0)


def test_a_round_with_a_non_member_is_refused(tmp_path):
    """The ghost of a replica the coordinator declared dead (its worker frozen, its averaging
    process still up) must not take part: every peer checks the group against the step's
    members and refuses the round, leaving its gradients as they were."""
    res = run_group(tmp_path, [("first", 1.0, 2), ("ghost", 3.0, 6)], step_members="first,second")
    for r in res.values():
        assert not r["summed"] and r["rounds"] == 3
        assert "non-member(s) ['ghost']" in r["detail"]
        assert r["g0"] == (1.0 if r["role"] == "first" else 3.0)  # untouched


def test_an_averager_refuses_tensors_of_another_layer_range():
    """A re-plan moved the stage from layers 1-4 to 3-4: the averager built for the old range must
    say so, not copy what fits (on a GPU run this was `size of tensor a (128) must match 50400`)."""
    import torch

    from worker.averaging import StageAverager

    old_range = [torch.Size([50400, 128]), torch.Size([128]), torch.Size([512, 128])]
    averager = StageAverager([], "test", 1, old_range, max_group=2, layers=(1, 4))
    try:
        with pytest.raises(ValueError, match=r"layer range it was built for \(stage, start, end = \(1, 1, 4\)\)"):
            averager.sum_gradients([torch.zeros(128), torch.zeros(512, 128)], 2, 4, expected_group=2)
    finally:
        averager.shutdown()
