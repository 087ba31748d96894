"""The averaging sidecar waits for a round's result while listening to the worker: a cancel of
this round ends the wait at once (the step's members changed), a stale cancel of an earlier
round does not, and a stop ends the sidecar (worker/averaging_sidecar._await_group)."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from worker.averaging_sidecar import _await_group, _Stopped


class _Round:
    """Stands in for hivemind's StepControl: done once `finish` is set."""

    def __init__(self, result=None):
        self.finish, self.value = threading.Event(), result

    def done(self) -> bool:
        return self.finish.is_set()

    def result(self):
        return self.value


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
    control = _Round()
    worker.send(("cancel", 8))
    with pytest.raises(RuntimeError, match="members changed"):
        _await_group(sidecar, control, 8, 10.0)


def test_a_stop_ends_the_sidecar_and_a_silent_round_times_out():
    sidecar, worker = mp.Pipe()
    worker.send(("stop",))
    with pytest.raises(_Stopped):
        _await_group(sidecar, _Round(), 1, 10.0)
    with pytest.raises(TimeoutError, match="no result after"):
        _await_group(sidecar, _Round(), 2, 0.05)
