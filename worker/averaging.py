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

hivemind runs in a SPAWNED sidecar process (worker/averaging_sidecar.py) that shares the
gradient buffers through shared memory (passed by file descriptor).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.multiprocessing

from gptjt_core.dht_auth import DhtCredentials
from gptjt_core.sidecar import private_socket_dir, remove_socket_dir

from .averaging_sidecar import COMPRESSIONS, serve

log = logging.getLogger(__name__)
WANTED_POLL_S = 0.2  # how often a waiting round asks whether it is still wanted (a cancel comes that late)


@dataclass
class RoundResult:
    """What one averaging round produced."""

    summed: bool  # False: the round failed (no group, timeout) and the gradients are unchanged
    group_size: int  # replicas in the round (this one included); 0: no group formed
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


class StageAverager:
    """Sums one stage's gradients across its replicas: hivemind in a spawned sidecar process.

    max_group: the most replicas a stage can have. A round's group is exactly the step's members
    (`expected_group` of sum_gradients): it starts as soon as all of them have joined and never
    with fewer (averaging_sidecar._members_averager_class says why); a lost member is the
    coordinator's to drop.
    initial_peers: multiaddrs of DHT peers to join (the coordinator's, live workers'); [] starts a new DHT.
    layers: the stage's layer range (start, end): part of the group key, so replicas that hold
    different ranges (a re-plan some have not applied yet) never meet in a round.
    stall_first_send_s: fault injection for tests; delays this peer's parts in its first round.
    credentials: this peer's access to the run's DHT (a key and the token Join returned): its DHT
    then talks only to holders of the same authority's tokens. None: an open DHT (tests only).
    """

    def __init__(self, initial_peers: list[str], run_name: str, stage: int, shapes: list[torch.Size],
                 max_group: int, compression: str = "none", matchmaking_s: float = 1.0, timeout: float = 10.0,
                 host: str = "127.0.0.1", ready_timeout: float = 120.0, stall_first_send_s: float = 0.0,
                 layers: tuple[int, int] = (0, 0), credentials: DhtCredentials | None = None):
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
        self._socket_dir = private_socket_dir()  # hivemind's daemon sockets, removed at shutdown
        self._process = ctx.Process(
            target=serve, name=f"gptjt-averager-stage{stage}",  # not daemonic: hivemind forks children
            args=(child, self.buffers, list(initial_peers), host_maddr,
                  f"gptjt_{run_name}_stage{stage}_layers{layers[0]}-{layers[1]}",
                  max_group, compression, matchmaking_s, timeout, self._sent, self._lost, stall_first_send_s,
                  os.getpid(), self._socket_dir, credentials))
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
        # Why this averager takes no more rounds ('' while it does): its sidecar is gone, or a
        # cancelled round may still write into its buffers. The step follower then builds a new one.
        self.retired = ""

    def sum_gradients(self, grads: list[torch.Tensor], micro_batches: int, total_micro_batches: int,
                      expected_group: int, contribute: bool = True, tag: tuple = (), worker_id: str = "",
                      members: list[str] | None = None, member_peers: list[str] | None = None,
                      wanted: Callable[[], bool] | None = None) -> RoundResult:
        """Replace `grads` (in place) by the stage's full-batch gradient across replicas.

        expected_group: replicas taking part, the step's members of this stage (1: no round, only
        the M / W scaling); the round waits for all of them, up to the timeout.
        contribute: False for a refused replica: it sends zeros with weight 0 and receives the sum.
        tag: e.g. (step, attempt); a group whose members disagree on it is a failed round.
        worker_id, members: who we are, and the replicas the coordinator made members of the step:
        a round with anyone else (the ghost of a replica declared dead) is a failed round.
        member_peers: the members' DHT peer ids (as the coordinator knows them from their
        heartbeats); libp2p authenticates a peer id, so an outsider cannot pass as a member.
        wanted: asked while the round waits; False abandons it (the step's members changed, so
        the group it waits for will never form: the caller retries with the new members).
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
        if self.retired:  # its buffers are not ours to fill
            return RoundResult(False, 0, 0.0, f"this replica's averager is retired ({self.retired})")
        self._fill_buffers(grads, mine)
        # "group": the member count this peer expects. Peers that have and have not yet seen the
        # coordinator drop a member can still meet (a peer starting its next round joins one whose
        # cancel has not landed yet): every peer then refuses the round and retries.
        info = {"tag": list(tag), "micro_batches": mine, "worker": worker_id, "group": expected_group}
        status, detail = self._exchange(info, 1.0 if mine > 0 else 0.0, expected_group, wanted)
        if status == "partial":  # a group formed, and hivemind lost parts of the round
            why, size = detail
            log.warning("averaging round failed (%s)", why)
            return RoundResult(False, size, 0.0, why)
        if status != "ok":
            log.warning("averaging round failed (%s)", detail)
            return RoundResult(False, 0, 0.0, detail)
        problem = _refusal(detail, tag, members, member_peers, expected_group)
        if problem:
            log.warning("discarding an averaging round: %s", problem)
            return RoundResult(False, len(detail), 0.0, problem)
        infos = [info for _, info in detail]
        contributors = sum(1 for i in infos if i["micro_batches"] > 0)
        weight = float(sum(i["micro_batches"] for i in infos))
        if weight <= 0:
            return RoundResult(False, len(infos), 0.0, "no replica in the group contributed a micro-batch")
        scale = contributors * total_micro_batches / weight  # mean -> sum -> full batch
        for buf, g in zip(self.buffers, grads):
            g.copy_((buf * scale).to(g.dtype))
        return RoundResult(True, len(infos), weight)

    def _fill_buffers(self, grads: list[torch.Tensor], micro_batches: int) -> None:
        """The round's input. A replica with nothing to add (refused, or no micro-batch routed to
        it) must have weight 0: the mean is over contributors, and the sum is that mean times their count."""
        for buf, g in zip(self.buffers, grads):
            if micro_batches > 0:
                buf.copy_(g.detach())
            else:
                buf.zero_()

    def _exchange(self, info: dict, weight: float, group_size: int,
                  wanted: Callable[[], bool] | None) -> tuple[str, object]:
        """One round of a group of `group_size` peers through the sidecar: ("ok", [(peer, info),
        ...]), ("partial", (why, group size)) or (a failure, why). When `wanted()` turns False the
        sidecar is told to cancel the round, and its answer (a failure) is awaited."""
        self._seq += 1
        # the sidecar answers within 2 x timeout + 5 s, plus RETIRE_WAIT_S for a failed round to end
        deadline, cancelled = time.monotonic() + 2 * self.timeout + 20, False
        try:
            self._conn.send(("step", self._seq, info, weight, group_size))
            while True:  # a reply to a round we gave up on may still be in the pipe: skip it
                if not self._conn.poll(WANTED_POLL_S):
                    if time.monotonic() > deadline:
                        return "failed", "the averaging process stopped answering"
                    if not cancelled and wanted is not None and not wanted():
                        self._conn.send(("cancel", self._seq))
                        cancelled = True
                    continue
                status, seq, detail = self._conn.recv()
                if status == "retired":  # the sidecar has exited; whichever round it was, none follows
                    self.retired = detail
                    return "failed", detail
                if seq == self._seq:
                    return status, detail
        except (OSError, EOFError) as e:
            # The sidecar is gone: a re-plan dropped this averager mid-round (the chaos soak saw a
            # ConnectionResetError stop the worker), or it died. A failed round, not a crash: the
            # step follower reports it and the next round has a new averager.
            self.retired = f"the averaging process is gone ({e!r})"
            return "failed", self.retired

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
        remove_socket_dir(self._socket_dir)


def _refusal(group: list[tuple[str, dict]], tag: tuple, members: list[str] | None,
             member_peers: list[str] | None, expected: int) -> str:
    """Why a finished round must not be used ("" if it may): fewer peers than the `expected`
    members (their sum leaves out a member's micro-batches, which the others will not), a DHT peer
    that is not one of the step's members (an outsider, or the averager of a replica declared
    dead), a non-member worker id, members that were averaging different step attempts, or peers
    that expected different member counts."""
    peers, infos = [p for p, _ in group], [i for _, i in group]
    if len(group) < expected:
        return f"the group had {len(group)} of the step's {expected} members"
    intruders = sorted(set(peers) - set(member_peers)) if member_peers is not None else []
    if intruders:
        return f"the group included non-member DHT peer(s) {intruders}"
    strangers = sorted({str(i.get("worker")) for i in infos} - set(members)) if members is not None else []
    if strangers:
        return f"the group included non-member(s) {strangers}"
    if any(info.get("tag") != list(tag) for info in infos):
        return f"the group mixed step attempts {sorted({tuple(i.get('tag', ())) for i in infos})}"
    if any(info.get("group") != expected for info in infos):
        return (f"the group's peers expected different member counts {sorted({str(i.get('group')) for i in infos})}: "
                "some had not yet seen the coordinator's new members of the step")
    return ""
