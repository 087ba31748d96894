"""The chaos soak's hold (local_swarm/replacement_hold.py): when it pauses, when it resumes, and
what it waits for. The real pause and resume over a swarm run in tests/integration/test_chaos.py;
here a recorder stands in for the swarm's two calls so that each decision can be checked alone."""

from __future__ import annotations

import pytest

from local_swarm.replacement_hold import STANDBY_SETTLED_S, ReplacementHold
from local_swarm.swarm import SwarmFailed


class PauseRecorder:
    def __init__(self):
        self.calls: list[bool] = []

    def set_paused(self, paused: bool) -> None:
        self.calls.append(paused)

    def logs_tail(self, chars: int = 2000) -> str:
        return "(logs)"


def status(phase: str = "open", **workers: tuple[str, int]) -> dict:
    return {"phase": phase, "workers": [{"name": n, "state": s, "stage": st} for n, (s, st) in workers.items()]}


def test_nothing_loading_holds_nothing():
    swarm = PauseRecorder()
    hold = ReplacementHold(swarm, 240.0, 0)
    assert hold.update(status(w0=("ready", 0)), 1.0) == (False, 0.0)
    assert swarm.calls == []


def test_pauses_while_a_replacement_loads_and_resumes_once_it_is_ready():
    swarm = PauseRecorder()
    hold = ReplacementHold(swarm, 240.0, 0)
    hold.started("w4")
    assert hold.update(status(w0=("ready", 0)), 10.0) == (True, 0.0)  # not even registered yet
    assert hold.update(status(w0=("ready", 0), w4=("loading", 1)), 12.0) == (True, 0.0)
    assert hold.update(None, 13.0) == (True, 0.0)  # coordinator restarting: the hold goes on
    assert hold.update(status(w0=("ready", 0), w4=("ready", 1)), 15.5) == (False, 5.5)
    assert swarm.calls == [True, False]
    assert hold.total_s(100.0) == 5.5


def test_a_standby_counts_as_loaded_only_once_it_stays_there():
    swarm = PauseRecorder()
    hold = ReplacementHold(swarm, 240.0, 0)
    hold.started("w4")
    assert hold.update(status(w4=("standby", -1)), 1.0)[0]
    assert hold.update(status(w4=("loading", 1)), 1.5)[0]  # passed through standby on its way to a stage
    assert hold.update(status(w4=("standby", -1)), 2.0)[0]
    assert hold.update(status(w4=("standby", -1)), 2.0 + STANDBY_SETTLED_S - 0.1)[0]
    assert hold.update(status(w4=("standby", -1)), 2.0 + STANDBY_SETTLED_S) == (False, 1.0 + STANDBY_SETTLED_S)


def test_a_killed_replacement_is_not_waited_for_and_a_done_run_is_not_paused():
    swarm = PauseRecorder()
    hold = ReplacementHold(swarm, 240.0, 0)
    hold.started("w4")
    assert hold.update(status("done"), 1.0) == (False, 0.0)
    hold.update(status(), 2.0)
    hold.gone("w4")
    assert hold.update(status(), 3.0) == (False, 1.0)
    assert swarm.calls == [True, False]


def test_a_replacement_that_never_loads_fails_the_soak_naming_it():
    hold = ReplacementHold(PauseRecorder(), 30.0, 7)
    hold.started("w9")
    hold.update(status(), 0.0)
    with pytest.raises(SwarmFailed, match=r"seed 7: replacement\(s\) \['w9'\] did not load within 30 s"):
        hold.update(status(w9=("loading", 0)), 31.0)
