"""A replica process for the averaging test: joins the DHT, sums its gradient with the group."""

from __future__ import annotations

import json
import sys
import time

import torch


def main() -> None:
    import hivemind

    from worker.averaging import StageAverager

    role, workdir, value, micro_batches, compression = sys.argv[1:6]
    peers_file = f"{workdir}/peers"
    initial = []
    if role != "first":
        while True:
            try:
                initial = open(peers_file).read().split()
                break
            except FileNotFoundError:
                time.sleep(0.1)
    for attempt in range(3):  # a loaded machine can miss the daemon's bootstrap deadline
        try:
            dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial)
            break
        except Exception:
            if attempt == 2:
                raise
            time.sleep(1.0)
    if role == "first":
        with open(peers_file + ".tmp", "w") as f:
            f.write("\n".join(str(a) for a in dht.get_visible_maddrs()))
        import os

        os.rename(peers_file + ".tmp", peers_file)
    grads = [torch.full((64, 33), float(value)), torch.full((17,), -float(value))]
    expected = int(sys.argv[6])
    averager = StageAverager(dht, "test", 0, [g.shape for g in grads], max_group=expected,
                             compression=compression, min_matchmaking_time=3.0, timeout=20.0)
    # barrier: every peer has its averager up before anyone starts the round
    open(f"{workdir}/ready-{role}", "w").close()
    import glob

    while len(glob.glob(f"{workdir}/ready-*")) < expected:
        time.sleep(0.05)
    if role == "vanish":
        print(json.dumps({"role": role, "vanishing": True}), flush=True)
        import os

        os._exit(0)  # disappears right before the round, as a SIGKILLed replica would
    t0 = time.perf_counter()
    result = averager.sum_gradients(grads, int(micro_batches), total_micro_batches=int(sys.argv[7]),
                                    expected_group=expected, contribute=role != "refused", tag=(0, 0))
    print(json.dumps({"role": role, "summed": result.summed, "group": result.group_size, "weight": result.weight,
                      "g0": float(grads[0][0, 0]), "g1": float(grads[1][0]),
                      "seconds": time.perf_counter() - t0}), flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
