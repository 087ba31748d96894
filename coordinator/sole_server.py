"""One coordinator at a time serves a SQLite ledger.

Two coordinators on one ledger file would each issue tickets, open steps and judge reports from
their own in-memory view of the run, and nothing between them would keep a micro-batch from
being counted twice. With the ledger in PostgreSQL the leadership lock keeps a second one
standing by (coordinator/standby.py); on SQLite, a coordinator started while another serves the
same file refuses to start, naming the other's process. The lock is an flock on
`{state_path}.lock`, held for as long as the coordinator serves: the kernel frees it when the
process ends, however it ends (a SIGKILLed coordinator can be restarted at once). Only serving
takes it: `gptjt token create` and the status process open the ledger beside a live coordinator.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("gptjt.coordinator")


class LedgerInUse(RuntimeError):
    """Another coordinator serves this ledger."""


@contextlib.contextmanager
def sole_server_of(state_path: str | None) -> Iterator[None]:
    """Hold `{state_path}.lock` while the body serves (None: nothing to hold, e.g. a PostgreSQL
    ledger). LedgerInUse names the process that holds it. A filesystem without locks (some
    network mounts) is warned about, not refused: the operator then keeps it to one by hand."""
    if state_path is None:
        yield
        return
    path = Path(f"{state_path}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise LedgerInUse(f"another coordinator (process {holder}) serves the ledger {state_path}; two must "
                              "never serve one run: stop that one first, or give this one another "
                              "coordinator.state_path (--state) for a new run") from None
        except OSError as e:
            log.warning("cannot lock %s (%s): make sure no other coordinator serves this ledger", path, e)
        else:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # frees the lock
