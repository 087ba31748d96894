"""The averaging sidecar: a hivemind DHT peer and DecentralizedAverager in a spawned process of its own.

Forking hivemind's processes from the worker itself is unsafe (a fork taken while gRPC, torch
or the compute thread hold a lock can leave the child hung forever), so the worker spawns this
process, which shares the gradient buffers through shared memory and answers one request a
round over a pipe (worker/averaging.py StageAverager). hivemind's own processes (and their p2pd
daemons) join its process group, which dies with the worker.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os

import torch
import torch.multiprocessing

from gptjt_core.sidecar import become_group_leader

from .hivemind_patches import count_lost_parts, counting, stall_first_send

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "fp16", "8bit-blockwise")


def hivemind_compression(name: str):
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression

    if name not in COMPRESSIONS:
        raise ValueError(f"averaging compression {name!r} is unknown; use one of {COMPRESSIONS}")
    return {"none": NoCompression, "fp16": Float16Compression, "8bit-blockwise": BlockwiseQuantization}[name]()


def serve(conn, buffers: list[torch.Tensor], initial_peers: list[str], host_maddr: str, prefix: str,
           max_group: int, compression: str, matchmaking_s: float, timeout: float, sent, lost,
           stall_first_send_s: float, parent_pid: int, socket_dir: str, credentials=None) -> None:
    """The sidecar: a DHT peer and a DecentralizedAverager over the shared `buffers`. With
    `credentials` (gptjt_core.dht_auth.DhtCredentials) the DHT peer signs its requests with this
    worker's token and answers only peers holding one of the same authority."""
    # Its own process group, which hivemind's DHT and averager processes (and their p2pd
    # daemons) join when forked: shutdown() can then kill them all if the sidecar hangs, and
    # the group dies with the worker (SIGKILL included).
    become_group_leader(parent_pid)
    # A spawned child inherits "spawn" as its start method; hivemind's processes need fork,
    # which is safe here: this process has no other threads yet.
    mp.set_start_method("fork", force=True)
    # hivemind switches torch to this sharing strategy on import (default "file_system") and then
    # re-shares, i.e. copies, any tensor shared another way: the sidecar would average a copy.
    os.environ["HIVEMIND_MEMORY_SHARING_STRATEGY"] = torch.multiprocessing.get_sharing_strategy()
    import hivemind
    from hivemind.averaging import DecentralizedAverager
    from hivemind.p2p import P2P

    from gptjt_core.dht_authorizer import RunMemberAuthorizer

    P2P._UNIX_SOCKET_PREFIX = f"/unix{socket_dir}/hivemind-"  # not /tmp: the worker removes the directory

    compression_ = counting(hivemind_compression(compression), sent)  # `sent` is shared with the worker
    count_lost_parts(lost)
    if stall_first_send_s > 0:
        stall_first_send(stall_first_send_s)
    # hivemind's DHT process is forked from here: it inherits the authorizer as it is
    authorizer = RunMemberAuthorizer(credentials) if credentials is not None else None
    try:
        dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=[host_maddr], authorizer=authorizer, start=True)
    except Exception as e:  # no bootstrap peer answered (a coordinator restarting, peers gone)
        # Start alone rather than not at all: others bootstrap from us (the coordinator hands out
        # our address), and the worker rebuilds us from fresh peers if rounds keep failing.
        log.warning("no DHT bootstrap peer answered (%s); starting alone", e)
        dht = hivemind.DHT(initial_peers=None, host_maddrs=[host_maddr], authorizer=authorizer, start=True)
    averager = DecentralizedAverager(
        buffers, dht, prefix=prefix, target_group_size=max_group, min_group_size=min(2, max_group),
        min_matchmaking_time=matchmaking_s,
        request_timeout=min(1.0, matchmaking_s / 2),  # hivemind: above the matchmaking time it can deadlock
        allreduce_timeout=timeout, next_chunk_timeout=timeout / 2,  # else a vanished peer hangs the round
        compression=compression_, start=True)
    conn.send(("ready", [str(a) for a in dht.get_visible_maddrs()]))
    try:
        _answer_rounds(conn, averager, timeout, lost)
    except EOFError:  # the worker is gone
        pass
    finally:
        averager.shutdown()
        dht.shutdown()


def _answer_rounds(conn, averager, timeout: float, lost) -> None:
    """Run each round the worker asks for and send back its group's infos, or why it failed."""
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        _, seq, gather, weight = message
        lost_before = lost.value
        # No retries inside hivemind: a failed attempt that lost parts would be counted
        # against the retry; the worker retries the round itself.
        control = averager.step(gather=gather, weight=weight, timeout=timeout, allow_retries=False, wait=False)
        try:
            group = control.result(timeout=2 * timeout + 5)  # matchmaking + all-reduce, bounded
            if not group:
                conn.send(("failed", seq, "no group"))
            elif lost.value != lost_before:  # failed, but a group formed: the DHT works
                conn.send(("partial", seq, (f"partial round: hivemind dropped a peer's parts (group of "
                                            f"{len(group)}); the averaged tensors are incomplete", len(group))))
            else:
                # each peer's id (authenticated by libp2p: derived from its key) with what it gathered
                conn.send(("ok", seq, [(str(peer), info) for peer, info in group.items()]))
        except Exception as e:  # hivemind raises on a failed round; the step must not stall
            control.cancel()
            conn.send(("failed", seq, f"{type(e).__name__}: {e}"))
