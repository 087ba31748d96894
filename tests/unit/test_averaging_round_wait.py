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
