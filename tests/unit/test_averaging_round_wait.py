"""The averaging sidecar waits for a round's result while listening to the worker: a cancel of
this round ends the wait at once (the step's members changed), a stale cancel of an earlier
round does not, and a stop ends the sidecar (worker/averaging_sidecar._await_group)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
from hivemind.averaging.control import AveragingStage

from worker.averaging_sidecar import _await_group, _cancel, _Stopped


class _Round:
    """Stands in for hivemind's StepControl: done once `finish` is set; a cancelled one is done at
    once (as hivemind's) and FINISHED in hivemind's process `ends_after_s` later."""

    def __init__(self, result=None, ends_after_s: float = 0.0):
        self.finish, self.value, self.ends_after_s = threading.Event(), result, ends_after_s
        self.cancelled_at = None

    def done(self) -> bool:
        return self.finish.is_set()

    def result(self):
        return self.value

    def cancel(self) -> bool:
        if self.finish.is_set():  # as hivemind's: its cancel future is already set
            raise RuntimeError("InvalidStateError")
        self.cancelled_at = time.monotonic()
        self.finish.set()
        return True

    @property
    def stage(self) -> AveragingStage:
        ended = self.cancelled_at is not None and time.monotonic() >= self.cancelled_at + self.ends_after_s
        return AveragingStage.FINISHED if ended else AveragingStage.RUNNING_ALLREDUCE


def test_a_finished_round_returns_its_group():
    sidecar, _worker = mp.Pipe()
    control = _Round({"peer": {"tag": [0, 0]}})
    threading.Timer(0.1, control.finish.set).start()
    assert _await_group(sidecar, control, 7, 10.0) == {"peer": {"tag": [0, 0]}}


def test_a_cancel_of_this_round_ends_the_wait_and_a_stale_one_does_not():
    sidecar, worker = mp.Pipe()
    control = _Round({"peer": {}})
    worker.send(("cancel", 6))  # of the round before: it ended before the cancel came
    threading.Timer(0.2, control.finish.set).start()
    assert _await_group(sidecar, control, 7, 10.0) == {"peer": {}}
    # A cancel of this round ends the wait, once hivemind's process has ended the round: an
    # all-reduce under way goes on after a cancel, adding into the buffers the next round fills.
    control = _Round(ends_after_s=0.3)
    worker.send(("cancel", 8))
    with pytest.raises(RuntimeError, match="members changed"):
        _await_group(sidecar, control, 8, 10.0)
    assert control.stage == AveragingStage.FINISHED
    _cancel(control)  # the failed round's clean-up cancels again: a no-op, not a dead sidecar


def test_a_stop_ends_the_sidecar_and_a_silent_round_times_out():
    sidecar, worker = mp.Pipe()
    worker.send(("stop",))
    with pytest.raises(_Stopped):
        _await_group(sidecar, _Round(), 1, 10.0)
    with pytest.raises(TimeoutError, match="no result after"):
        _await_group(sidecar, _Round(), 2, 0.05)


def _raise_all_reduce_failed():
    raise RuntimeError("all-reduce failed")


def test_a_cancelled_round_that_does_not_end_retires_the_sidecar(monkeypatch):
    """A round cancelled by the worker (or one that failed) and still running in hivemind's process
    at its deadline may yet add into the shared buffers: the sidecar answers "retired" and takes no
    other round, instead of letting the next round's inputs be copied under a live all-reduce."""
    import worker.averaging_sidecar as sidecar_module

    sidecar, worker = mp.Pipe()
    control = _Round(ends_after_s=60.0)  # its all-reduce goes on long after the cancel
    worker.send(("cancel", 3))
    with pytest.raises(sidecar_module._BuffersBusy, match="may still write into this averager's buffers"):
        _await_group(sidecar, control, 3, 0.2)

    class _Averager:  # stands in for hivemind's averager: each round fails and never ends
        def __init__(self):
            self.rounds = 0

        def expect_group(self, size):
            pass

        def step(self, **kwargs):
            self.rounds += 1
            round_ = _Round()  # never cancelled, so never FINISHED
            round_.result = _raise_all_reduce_failed
            round_.finish.set()
            return round_

    monkeypatch.setattr(sidecar_module, "RETIRE_WAIT_S", 0.2)
    averager = _Averager()
    worker.send(("step", 1, {}, 1.0, 2))
    worker.send(("step", 2, {}, 1.0, 2))  # never taken: the sidecar has retired
    sidecar_module._answer_rounds(sidecar, averager, 1.0, mp.Value("q", 0))
    status, seq, why = worker.recv()
    assert (status, seq) == ("retired", 1) and "all-reduce failed" in why and "retires" in why
    assert averager.rounds == 1


def test_a_retired_averager_takes_no_round_and_touches_no_buffer():
    """The worker's half: once its sidecar answers "retired" (or is gone), StageAverager fails every
    round at once with the reason, leaving the gradients and the shared buffers as they are (the
    step follower then builds a new averager: worker/step_follower.py)."""
    import torch

    from worker.averaging import StageAverager

    averager = StageAverager.__new__(StageAverager)
    ours, theirs = mp.Pipe()
    averager._conn, averager._seq, averager.timeout, averager.retired = ours, 0, 1.0, ""
    averager.shapes, averager.buffers = [torch.Size([2])], [torch.full((2,), 7.0, dtype=torch.float64)]
    threading.Timer(0.1, lambda: theirs.send(("retired", 1, "its cancelled round had not ended"))).start()
    grads = [torch.ones(2)]
    first = averager.sum_gradients(grads, 1, 2, expected_group=2)
    assert not first.summed and "had not ended" in first.detail
    assert averager.retired == "its cancelled round had not ended"
    theirs.recv()  # the round's request
    averager.buffers[0].fill_(-1.0)  # what a still-running all-reduce might write
    second = averager.sum_gradients(grads, 1, 2, expected_group=2)
    assert not second.summed and "retired" in second.detail
    assert not theirs.poll(0.1)  # nothing sent to the retired sidecar
    assert averager.buffers[0].tolist() == [-1.0, -1.0] and grads[0].tolist() == [1.0, 1.0]
    theirs.close()
    averager.retired = ""  # a sidecar that is gone retires its averager too
    gone = averager.sum_gradients(grads, 1, 2, expected_group=2)
    assert not gone.summed and "is gone" in averager.retired
