"""Sidecar processes that die with their parent, their whole process group included.

hivemind forks a DHT process (and an averager process) that start a p2pd daemon each. A
sidecar puts itself in a process group of its own, which those children join, and calls
`die_with_parent` so that the group goes down when the process that spawned it does, SIGKILL
included: no orphaned daemons after a crash.
"""

from __future__ import annotations

import os
import signal
import threading
import time

WATCHDOG_PERIOD_S = 0.5


def die_with_parent(parent_pid: int) -> None:
    """Kill this process's group once `parent_pid` is no longer our parent (it died: we were
    re-parented to init or a subreaper), within WATCHDOG_PERIOD_S. A polling thread, not
    PR_SET_PDEATHSIG: that fires when the parent THREAD that spawned us ends, and the worker
    spawns its sidecar from a pool thread."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCHDOG_PERIOD_S)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def become_group_leader(parent_pid: int) -> None:
    """Start a process group of our own and tie it to the parent's life."""
    os.setpgid(0, 0)
    die_with_parent(parent_pid)
