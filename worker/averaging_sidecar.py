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
import time

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
    averager = _members_averager_class()(
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


def _members_averager_class():
    """hivemind's DecentralizedAverager, told before each round how many peers its group must have.

    Built with min_group_size 2 and target_group_size max_group (replicas_per_stage), hivemind
    starts a round with any 2 peers once matchmaking_s has passed. With three members alive, two
    could start without the third at every try (seen on loaded cores, 2026-12-06): their sums
    leave out the third's micro-batches, the third never averages, and the step stalls until the
    coordinator restarts it and at last falls back to one replica. The step's members are known
    (the coordinator names them), so each round's group is exactly that many: it starts as soon
    as all of them have joined (no matchmaking_s wait when the stage is short of max_group) and
    never with fewer. A member lost for good is the coordinator's to drop from the step's members;
    the worker then cancels a round still waiting for it (_await_group) and starts one with those
    left."""
    from hivemind.averaging import DecentralizedAverager
    from hivemind.utils.mpfuture import MPFuture

    class MembersAverager(DecentralizedAverager):
        def expect_group(self, size: int) -> None:
            """Make the next rounds' groups exactly `size` peers (2 .. target_group_size given at
            construction); returns once the averager's process has taken it. Rounds of one step
            and most steps after it expect the same size: only a change goes to that process."""
            if getattr(self, "_expected_size", None) == size:
                return
            future = MPFuture()
            self._outer_pipe.send(("_expect_group", [], dict(size=size, future=future)))
            future.result(timeout=30)
            self._expected_size = size

        async def _expect_group(self, size: int, future: MPFuture) -> None:
            # Runs in the averager's own process, before any round asked for after it: the
            # process starts a task per message in the order they come.
            try:
                matchmaking = self._matchmaking
                matchmaking.min_group_size = matchmaking.target_group_size = size
                future.set_result(None)
            except Exception as e:
                future.set_exception(e)

    return MembersAverager


def _answer_rounds(conn, averager, timeout: float, lost) -> None:
    """Run each round the worker asks for and send back its group's infos, or why it failed."""
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        if message[0] == "cancel":  # of a round that ended before the worker's cancel came
            continue
        _, seq, gather, weight, group_size = message
        lost_before = lost.value
        try:
            averager.expect_group(group_size)
        except Exception as e:  # the averager's process is not answering: a failed round, reported
            conn.send(("failed", seq, f"could not set the round's group size: {type(e).__name__}: {e}"))
            continue
        # No retries inside hivemind: a failed attempt that lost parts would be counted
        # against the retry; the worker retries the round itself.
        control = averager.step(gather=gather, weight=weight, timeout=timeout, allow_retries=False, wait=False)
        try:
            group = _await_group(conn, control, seq, 2 * timeout + 5)  # matchmaking + all-reduce, bounded
            if not group:
                conn.send(("failed", seq, "no group"))
            elif lost.value != lost_before:  # failed, but a group formed: the DHT works
                conn.send(("partial", seq, (f"partial round: hivemind dropped a peer's parts (group of "
                                            f"{len(group)}); the averaged tensors are incomplete", len(group))))
            else:
                # each peer's id (authenticated by libp2p: derived from its key) with what it gathered
                conn.send(("ok", seq, [(str(peer), info) for peer, info in group.items()]))
        except _Stopped:
            _cancel(control)
            return
        except _BuffersBusy as e:
            conn.send(("retired", seq, str(e)))
            return  # no later round may fill buffers a cancelled all-reduce may still add into
        except Exception as e:  # hivemind raises on a failed round; the step must not stall
            _cancel(control)
            why = f"{type(e).__name__}: {e}"
            if not _wait_finished(control, time.monotonic() + RETIRE_WAIT_S):
                conn.send(("retired", seq, f"{why}; {_busy_reason(RETIRE_WAIT_S)}"))
                return
            conn.send(("failed", seq, why))


class _Stopped(Exception):
    """The worker asked the sidecar to stop while a round was under way."""


class _BuffersBusy(Exception):
    """A cancelled round was still running in hivemind's process at its deadline: its all-reduce may
    yet add into the shared buffers, so this sidecar must take no other round (the worker builds a
    new averager, with buffers of its own)."""


POLL_S = 0.01  # how often a round's wait looks at the worker's pipe: adds at most this to a round
SLOW_CANCEL_S = 1.0  # a cancelled round that takes longer to end says where hivemind was (an all-reduce under way)
# How long a round that failed or timed out gets to end in hivemind's process after its cancel (s)
# before the sidecar retires. Within the worker's slack: it waits 2 x timeout + 20 s for an answer,
# the sidecar's own wait is 2 x timeout + 5 s.
RETIRE_WAIT_S = 10.0


def _busy_reason(waited_s: float) -> str:
    return (f"the cancelled round had not ended in hivemind's process {waited_s:.1f} s after its cancel, so its "
            "all-reduce may still write into this averager's buffers; the averager retires and a new one is built")


def _await_group(conn, control, seq: int, limit_s: float):
    """Round `seq`'s result (hivemind's group infos), waiting at most limit_s. The worker may cancel
    the round meanwhile (the step's members changed: the group it waits for will never form)."""
    deadline = time.monotonic() + limit_s
    while not control.done():
        if conn.poll(POLL_S):
            message = conn.recv()
            if message[0] == "stop":
                raise _Stopped()
            if message[0] == "cancel" and message[1] == seq:
                stage = control.stage  # hivemind heeds a cancel only while it matchmakes
                _cancel(control)
                cancelled_at = time.monotonic()
                if not _wait_finished(control, deadline):
                    raise _BuffersBusy(_busy_reason(time.monotonic() - cancelled_at))
                waited = time.monotonic() - cancelled_at
                raise RuntimeError("cancelled by the worker: the step's members changed while the round looked "
                                   "for its group" + (f" (hivemind's round was at {stage.name} and ended {waited:.1f} "
                                                      "s after the cancel)" if waited > SLOW_CANCEL_S else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(f"the round had no result after {limit_s:.0f} s")
    return control.result()


def _cancel(control) -> None:
    """Cancel a round unless it is over (hivemind's cancel of a finished or cancelled step raises)."""
    if not control.done():
        control.cancel()


def _wait_finished(control, deadline: float) -> bool:
    """Wait (until `deadline`) for a cancelled round to end in hivemind's process; False if it has not.
    hivemind looks for a cancel only while it matchmakes: a round whose group has just formed goes
    on with its all-reduce, adding into the shared buffers, where the next round's inputs must not
    be copied before it ends (seen: a peer starting its next round met the other's cancelled one)."""
    from hivemind.averaging.control import AveragingStage

    while control.stage != AveragingStage.FINISHED:
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True
