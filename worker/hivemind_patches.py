"""Patches of hivemind's averaging, applied in the averaging sidecar before it forks hivemind's processes.

Two make a round's outcome honest (count bytes sent; count parts hivemind silently dropped, so
a partial round is reported as failed), one is fault injection for tests (stall a first send).
"""

from __future__ import annotations


def count_lost_parts(lost) -> None:
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


def stall_first_send(seconds: float) -> None:
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


def counting(compression, counter):
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
