"""A replica process for the averaging test: joins the DHT, sums its gradient with the group."""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import torch


MATCHMAKING_S = 3.0
LATE_S = MATCHMAKING_S + 2.0


def run_member(workdir: str, role: str):
    """This peer's access to the test's DHT: a token for its own key from the authority key the
    test wrote (as the coordinator signs one at Join)."""
    from gptjt_core.dht_auth import DhtCredentials, dht_public_key, issue_token, new_dht_key

    authority, key = open(f"{workdir}/authority.der", "rb").read(), new_dht_key()
    return DhtCredentials(key, issue_token(authority, role, dht_public_key(key), 600.0), dht_public_key(authority))


def main() -> None:
    from worker.averaging import StageAverager

    role, workdir, value, micro_batches, compression = sys.argv[1:6]
    expected, total = int(sys.argv[6]), int(sys.argv[7])
    timeout, stall_s = float(sys.argv[8]), float(sys.argv[9])
    members = sys.argv[10].split(",") if len(sys.argv) > 10 and sys.argv[10] else None  # the step's members
    # The test's stand-in for the coordinator declaring the vanished member dead: from then on the
    # step names one member fewer, and a round still waiting for the old members is not wanted.
    dropped = f"{workdir}/dropped"
    peers_file = f"{workdir}/peers"
    initial = []
    if role != "first":
        while not os.path.exists(peers_file):
            time.sleep(0.1)
        initial = open(peers_file).read().split()
    grads = [torch.full((64, 33), float(value)), torch.full((17,), -float(value))]
    averager = StageAverager(initial, "test", 0, [g.shape for g in grads], max_group=expected,
                             compression=compression, matchmaking_s=MATCHMAKING_S, timeout=timeout,
                             stall_first_send_s=stall_s if role == "stalled" else 0.0,
                             credentials=run_member(workdir, role))
    if role == "first":  # the bootstrap peer publishes its address
        with open(peers_file + ".tmp", "w") as f:
            f.write("\n".join(averager.visible_maddrs))
        os.rename(peers_file + ".tmp", peers_file)
    # barrier: every peer has its averager up before anyone starts the round
    open(f"{workdir}/ready-{role}", "w").close()
    while len(glob.glob(f"{workdir}/ready-*")) < expected:
        time.sleep(0.05)
    if role == "vanish":
        print(json.dumps({"role": role, "vanishing": True}), flush=True)
        os._exit(0)  # disappears right before the round, as a SIGKILLed replica would
    if role == "late":  # still computing when the others start the round: past their matchmaking time
        time.sleep(LATE_S)
    t0 = time.perf_counter()
    # As a worker does while its step is still averaging: a failed round leaves the gradients as
    # they were, and the group tries again.
    rounds, failed_groups = 0, []  # (group size, why) of each failed round (size 0: none formed)
    while rounds < 3:
        rounds += 1
        group = expected - 1 if os.path.exists(dropped) else expected
        result = averager.sum_gradients(grads, int(micro_batches), total_micro_batches=total,
                                        expected_group=group, contribute=role != "refused", tag=(0, 0),
                                        worker_id=role, members=members,
                                        wanted=lambda: os.path.exists(dropped) == (group < expected))
        if result.summed or role == "vanish":
            break
        failed_groups.append((result.group_size, result.detail))
    seconds = time.perf_counter() - t0
    # A peer has its own result before it has sent the others theirs (it reduces a part for
    # them): stay up until every peer that took part is done, as a worker would.
    open(f"{workdir}/done-{role}", "w").close()
    finishing = expected - os.path.exists(f"{workdir}/ready-vanish")  # a vanished peer never finishes
    deadline = time.monotonic() + 60
    while len(glob.glob(f"{workdir}/done-*")) < finishing and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the last averaged parts this peer sends back may still be on their way
    print(json.dumps({"role": role, "summed": result.summed, "group": result.group_size, "weight": result.weight,
                      "g0": float(grads[0][0, 0]), "g1": float(grads[1][0]), "g_last": float(grads[0][-1, -1]),
                      "seconds": seconds, "rounds": rounds, "failed_groups": failed_groups, "detail": result.detail,
                      "bytes_sent": averager.bytes_sent}), flush=True)
    averager.shutdown()


if __name__ == "__main__":
    main()
