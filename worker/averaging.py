"""Summing a stage's gradients across its data-parallel replicas with hivemind.

The loss is normalised by the GLOBAL batch, so the stage's full-batch gradient is the SUM of
its replicas' accumulated gradients. Each contributing replica enters its own sum g_r with
weight 1 (a refused, poisoned replica, or one that processed no micro-batch, enters zeros with
weight 0, so it still receives the result and stays identical to the others); hivemind's
weighted mean times the number of contributors is then sum(g_r). Every member also gathers how many micro-batches each
contributor holds (W in total). When W is short of the step's M micro-batches (a replica
died and took its share along), the sum is scaled by M / W: the lost share is estimated by
the survivors' mean gradient per micro-batch.

With compression "none" the buffers are float64: sums of float32 gradients are then exact,
hivemind's "own + (mean - own)" delta arithmetic returns the same mean to every member, and
casting back to float32 gives every replica bit-identical gradients. Lossy compressions
round each member's delta differently, so replicas then differ by the compression error.

hivemind runs in a SPAWNED sidecar process (its own DHT peer and averager) that shares the
gradient buffers through shared memory (passed by file descriptor). Forking hivemind's processes from the worker itself
is unsafe: a fork taken while gRPC, torch or the compute thread hold a lock can leave the
child hung forever, which we saw happen.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass

import torch
import torch.multiprocessing

from gptjt_core.sidecar import become_group_leader

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "fp16", "8bit-blockwise")


def hivemind_compression(name: str):
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression

    if name not in COMPRESSIONS:
        raise ValueError(f"averaging compression {name!r} is unknown; use one of {COMPRESSIONS}")
    return {"none": NoCompression, "fp16": Float16Compression, "8bit-blockwise": BlockwiseQuantization}[name]()


@dataclass
class RoundResult:
    """What one averaging round produced."""

    summed: bool  # False: the round failed (no group, timeout) and the gradients are unchanged
    group_size: int  # replicas in the round (this one included)
    weight: float  # micro-batches whose gradients the result holds
    detail: str = ""  # why the round failed (reported to the coordinator)


def sum_alone(grads: list[torch.Tensor], micro_batches: int, total_micro_batches: int) -> RoundResult:
    """The only replica of its stage: no round, only the M / W scaling of its own share."""
    if micro_batches <= 0:
        return RoundResult(False, 1, 0.0, "no micro-batch of the step reached this replica")
    if micro_batches != total_micro_batches:
        for g in grads:
            g.mul_(total_micro_batches / micro_batches)
    return RoundResult(True, 1, float(micro_batches))


def _count_lost_parts(lost) -> None:
    """Make hivemind add to `lost` (a shared counter) every time a round silently loses parts.

    hivemind keeps a round alive when a peer is slow: a reducer that has not heard from a sender
    within sender_timeout averages that part WITHOUT it, and a sender whose reducer never answers
    keeps its OWN values for that part. Either way the step still "succeeds" and only a log line
    says so. For us that is a wrong, and replica-divergent, gradient (a 2-replica sum of 1.0 and
    3.0 came back as 6.0 on one replica), so the sidecar reports such a round as failed and the
    worker retries it. Patched on the classes before the averager's process is forked, so the
    fork inherits it; `lost` is shared memory, read by the sidecar around each round.

    Only the peers that lost parts see it: in a group of three, a third peer whose slices all
    reached healthy reducers gets a result that misses the stalled sender's share of one slice.
    Its replicas then report different group weights or gradient norms, and the coordinator
    re-runs the step (coordinator/ledger/rules.py, replicas_disagree)."""
    from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

    if getattr(TensorPartReducer.on_sender_failed, "_gptjt_counting", False):
        return

    def add() -> None:
        with lost.get_lock():
            lost.value += 1

    on_sender_failed = TensorPartReducer.on_sender_failed

    def on_sender_failed_counted(self, sender_index: int):
        # A sender banned after it delivered every part lost nothing (hivemind keeps those parts).
        if not self.finished.is_set() and self.num_parts_received[sender_index] < self.num_parts:
            add()
        return on_sender_failed(self, sender_index)

    register_failed_reducer = TensorPartContainer.register_failed_reducer

    def register_failed_reducer_counted(self, peer_index: int):
        # Parts not yet back from that reducer are about to be replaced by our own, unaveraged ones.
        if self._outputs_registered_by_peer[peer_index] < self.num_parts_by_peer[peer_index]:
            add()
        return register_failed_reducer(self, peer_index)

    on_sender_failed_counted._gptjt_counting = True
    TensorPartReducer.on_sender_failed = on_sender_failed_counted
    TensorPartContainer.register_failed_reducer = register_failed_reducer_counted


def _stall_first_send(seconds: float) -> None:
    """Fault injection for tests: this peer's first part to each reducer leaves `seconds` late in
    its first round, as from a peer whose link or CPU stalls mid-round."""
    import asyncio

    from hivemind.averaging.allreduce import AllReduceRunner

    generate = AllReduceRunner._generate_input_for_peer
    rounds_stalled = set()

    async def stalled(self, peer_index: int):
        if not rounds_stalled or self.group_id in rounds_stalled:
            rounds_stalled.add(self.group_id)
            await asyncio.sleep(seconds)
        async for message in generate(self, peer_index):
            yield message

    AllReduceRunner._generate_input_for_peer = stalled


def _serve(conn, buffers: list[torch.Tensor], initial_peers: list[str], host_maddr: str, prefix: str,
           max_group: int, compression: str, matchmaking_s: float, timeout: float, sent, lost,
           stall_first_send_s: float, parent_pid: int) -> None:
    """The sidecar: a DHT peer and a DecentralizedAverager over the shared `buffers`."""
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

    compression_ = _counting(hivemind_compression(compression), sent)  # `sent` is shared with the worker
    _count_lost_parts(lost)
    if stall_first_send_s > 0:
        _stall_first_send(stall_first_send_s)
    try:
        dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=[host_maddr], start=True)
    except Exception as e:  # no bootstrap peer answered (a coordinator restarting, peers gone)
        # Start alone rather than not at all: others bootstrap from us (the coordinator hands out
        # our address), and the worker rebuilds us from fresh peers if rounds keep failing.
        log.warning("no DHT bootstrap peer answered (%s); starting alone", e)
        dht = hivemind.DHT(initial_peers=None, host_maddrs=[host_maddr], start=True)
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
            elif lost.value != lost_before:
                conn.send(("failed", seq, f"partial round: hivemind dropped a peer's parts (group of "
                                          f"{len(group)}); the averaged tensors are incomplete"))
            else:
                conn.send(("ok", seq, list(group.values())))
        except Exception as e:  # hivemind raises on a failed round; the step must not stall
            control.cancel()
            conn.send(("failed", seq, f"{type(e).__name__}: {e}"))


def _counting(compression, counter):
    """`compression` that also adds the size of everything this peer sends to `counter`: the
    parts it sends (compressed by this object) and the averaged deltas it sends back (which
    hivemind serializes through allreduce.serialize_torch_tensor, patched here, in the sidecar)."""
    import hivemind.averaging.allreduce as allreduce

    def add(message):
        with counter.get_lock():
            counter.value += message.ByteSize()
        return message

    if not getattr(allreduce.serialize_torch_tensor, "_gptjt_counting", False):
        original = allreduce.serialize_torch_tensor

        def serialize_counted(*args, **kwargs):
            return add(original(*args, **kwargs))

        serialize_counted._gptjt_counting = True
        allreduce.serialize_torch_tensor = serialize_counted

    class Counting(type(compression)):
        """The compression, counting every byte it produces."""

        def compress(self, tensor, info, allow_inplace=False):
            return add(super().compress(tensor, info, allow_inplace))

    counted = Counting.__new__(Counting)
    counted.__dict__.update(compression.__dict__)
    return counted


class StageAverager:
    """Sums one stage's gradients across its replicas: hivemind in a spawned sidecar process.

    max_group: the most replicas a stage can have; a round starts after matchmaking_s with at
    least two of them, so the survivors of a lost replica still average.
    initial_peers: multiaddrs of DHT peers to join (the coordinator's, live workers'); [] starts a new DHT.
    layers: the stage's layer range (start, end): part of the group key, so replicas that hold
    different ranges (a re-plan some have not applied yet) never meet in a round.
    stall_first_send_s: fault injection for tests; delays this peer's parts in its first round.
    """

    def __init__(self, initial_peers: list[str], run_name: str, stage: int, shapes: list[torch.Size],
                 max_group: int, compression: str = "none", matchmaking_s: float = 1.0, timeout: float = 10.0,
                 host: str = "127.0.0.1", ready_timeout: float = 120.0, stall_first_send_s: float = 0.0,
                 layers: tuple[int, int] = (0, 0)):
        if compression not in COMPRESSIONS:
            raise ValueError(f"averaging compression {compression!r} is unknown; use one of {COMPRESSIONS}")
        self.timeout = timeout
        self.shapes = [torch.Size(s) for s in shapes]
        self.key = (stage, *layers)
        dtype = torch.float64 if compression == "none" else torch.float32
        # Shared by file descriptor (torch's default), which needs no torch_shm_manager daemon: that
        # daemon's start-up timed out under load. The sidecar tells hivemind to keep this strategy.
        self.buffers = [torch.zeros(s, dtype=dtype).share_memory_() for s in shapes]
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # Tensor bytes this replica's rounds sent (parts out, averaged parts back), counted live in
        # the sidecar: a peer has its own result before it has sent the others theirs.
        self._sent = ctx.Value("q", 0)
        # Parts hivemind dropped from a round (a banned sender, a reducer that never answered),
        # counted in the averager's process: a round that lost any is reported as failed.
        self._lost = ctx.Value("q", 0)
        host_maddr = f"/ip4/{host}/tcp/0" if host.replace(".", "").isdigit() else "/ip4/0.0.0.0/tcp/0"
        self._process = ctx.Process(
            target=_serve, name=f"gptjt-averager-stage{stage}",  # not daemonic: hivemind forks children
            args=(child, self.buffers, list(initial_peers), host_maddr,
                  f"gptjt_{run_name}_stage{stage}_layers{layers[0]}-{layers[1]}",
                  max_group, compression, matchmaking_s, timeout, self._sent, self._lost, stall_first_send_s,
                  os.getpid()))
        self._process.start()
        child.close()
        try:
            if not self._conn.poll(ready_timeout):
                raise RuntimeError(f"the averaging process did not start within {ready_timeout:.0f} s")
            _, self.visible_maddrs = self._conn.recv()
        except (EOFError, OSError) as e:  # it died starting (its log says why)
            self.shutdown()
            raise RuntimeError(f"the averaging process exited while starting ({type(e).__name__}); see the log "
                               "above") from None
        except RuntimeError:
            self.shutdown()
            raise
        self._seq = 0  # numbers each round's request, so a late reply is never taken for a new one

    def sum_gradients(self, grads: list[torch.Tensor], micro_batches: int, total_micro_batches: int,
                      expected_group: int, contribute: bool = True, tag: tuple = (), worker_id: str = "",
                      members: list[str] | None = None) -> RoundResult:
        """Replace `grads` (in place) by the stage's full-batch gradient across replicas.

        expected_group: replicas taking part (1: no round, only the M / W scaling).
        contribute: False for a refused replica: it sends zeros with weight 0 and receives the sum.
        tag: e.g. (step, attempt); a group whose members disagree on it is a failed round.
        worker_id, members: who we are, and the replicas the coordinator made members of the step:
        a round with anyone else (the ghost of a replica declared dead) is a failed round.
        On failure (no group, timeout, mismatched tags) `grads` are left unchanged.
        """
        shapes = [g.shape for g in grads]
        if shapes != self.shapes:
            raise ValueError(f"this averager sums {len(self.shapes)} tensors of the layer range it was built for "
                             f"(stage, start, end = {self.key}), not these {len(shapes)}; build one for the new "
                             "range")
        if contribute and not all(torch.isfinite(g).all() for g in grads):
            raise ValueError("non-finite gradients must not be averaged; pass contribute=False")
        mine = micro_batches if contribute else 0
        if expected_group <= 1:
            return sum_alone(grads, mine, total_micro_batches)
        # A replica with nothing to add (refused, or no micro-batch routed to it) must have weight
        # 0: the mean is over contributors, and the sum is that mean times their count.
        for buf, g in zip(self.buffers, grads):
            if mine > 0:
                buf.copy_(g.detach())
            else:
                buf.zero_()
        self._seq += 1
        self._conn.send(("step", self._seq, {"tag": list(tag), "micro_batches": mine, "worker": worker_id},
                         1.0 if mine > 0 else 0.0))
        while True:  # a reply to a round we gave up on may still be in the pipe: skip it
            if not self._conn.poll(2 * self.timeout + 15):
                raise RuntimeError("the averaging process stopped answering")
            status, seq, detail = self._conn.recv()
            if seq == self._seq:
                break
        if status != "ok":
            log.warning("averaging round failed (%s)", detail)
            return RoundResult(False, 0, 0.0, detail)
        infos = detail
        if any(info.get("tag") != list(tag) for info in infos):
            tags = sorted({tuple(i.get("tag", ())) for i in infos})
            log.warning("averaging group mixed step attempts %s; discarding the round", tags)
            return RoundResult(False, len(infos), 0.0, f"the group mixed step attempts {tags}")
        strangers = sorted({str(i.get("worker")) for i in infos} - set(members)) if members is not None else []
        if strangers:
            log.warning("averaging group included %s, not a member of this step; discarding the round", strangers)
            return RoundResult(False, len(infos), 0.0, f"the group included non-member(s) {strangers}")
        contributors = sum(1 for i in infos if i["micro_batches"] > 0)
        weight = float(sum(i["micro_batches"] for i in infos))
        if weight <= 0:
            return RoundResult(False, len(infos), 0.0, "no replica in the group contributed a micro-batch")
        scale = contributors * total_micro_batches / weight  # mean -> sum -> full batch
        for buf, g in zip(self.buffers, grads):
            g.copy_((buf * scale).to(g.dtype))
        return RoundResult(True, len(infos), weight)

    @property
    def bytes_sent(self) -> int:
        """Tensor bytes this replica's averaging has sent so far (parts out, averaged parts back)."""
        return self._sent.value

    def shutdown(self) -> None:
        try:
            self._conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        self._process.join(10)
        if self._process.is_alive():  # stuck in a round: take hivemind's processes along
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._process.join(5)
