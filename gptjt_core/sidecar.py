"""Sidecar processes that die with their parent, their whole process group included.

hivemind forks a DHT process (and an averager process) that start a p2pd daemon each. A
sidecar puts itself in a process group of its own, which those children join, and calls
`die_with_parent` so that the group goes down when the process that spawned it does, SIGKILL
included: no orphaned daemons after a crash. hivemind's daemons put their sockets in /tmp; a
sidecar puts them in a private directory its parent removes when it is done
(`private_socket_dir`), and one a killed parent left behind is removed by the next process to
start (`reap_socket_dirs`).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

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


_SOCKET_DIR_PREFIX = "gptjt-p2p-"


def private_socket_dir() -> str:
    """A directory for one sidecar's daemon sockets, named after this (the parent) process."""
    reap_socket_dirs()
    return tempfile.mkdtemp(prefix=f"{_SOCKET_DIR_PREFIX}{os.getpid()}-")


def remove_socket_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def reap_socket_dirs() -> None:
    """Remove the socket directories of parents that are gone (killed before they could)."""
    for path in Path(tempfile.gettempdir()).glob(_SOCKET_DIR_PREFIX + "*"):
        try:
            pid = int(path.name[len(_SOCKET_DIR_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)  # raises if the process is gone
        except (ValueError, ProcessLookupError):
            remove_socket_dir(str(path))
        except PermissionError:  # another user's live process
            pass
