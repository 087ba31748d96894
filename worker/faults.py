"""Fault injection for tests and drills: GPTJT_FAULTS="kind@step[,kind@step...]".

Kinds:
  poison@N          multiply this replica's gradient at step N by 1e6 before it is contributed
                    (a byzantine or broken replica; the coordinator must refuse it)
  nan@N             put NaN in this replica's gradient at step N
  die-averaging@N   SIGKILL this process halfway through the matchmaking of its averaging round
                    at step N (its group is forming, and then it is gone)
  die-checkpoint@N  SIGKILL this process halfway through uploading its stage's checkpoint of
                    step N (the state after N steps) to the store
  isolate-averaging@N  from step N on, this replica's rounds carry a tag no other replica uses
                    (a modified or broken peer): every round of its stage fails, rebuilt
                    averagers included, until the coordinator takes a replica out

GPTJT_FAULTS_ONCE_DIR: a directory shared by the swarm's workers. When set, each kind@step
fires in ONE process only, once (the first to create its marker file there): a chaos soak arms
every worker with the same faults and exactly one of them dies.

Unset in normal runs; parsing is strict so a typo fails loudly instead of silently testing nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

KINDS = ("poison", "nan", "die-averaging", "die-checkpoint", "isolate-averaging")


def parse_faults(text: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"([a-z-]+)@(\d+)", item)
        if m is None or m.group(1) not in KINDS:
            raise ValueError(f"GPTJT_FAULTS item {item!r} is invalid: expected KIND@STEP with KIND in {KINDS}")
        faults[m.group(1)] = int(m.group(2))
    return faults


class Faults:
    """The faults armed in this process; `fires(kind, step)` says whether one applies now."""

    def __init__(self, armed: dict[str, int], once_dir: str = ""):
        self.armed = armed
        self.once_dir = Path(once_dir) if once_dir else None

    @classmethod
    def from_env(cls) -> Faults:
        return cls(parse_faults(os.environ.get("GPTJT_FAULTS", "")), os.environ.get("GPTJT_FAULTS_ONCE_DIR", ""))

    def fires(self, kind: str, step: int) -> bool:
        if self.armed.get(kind) != step:
            return False
        if self.once_dir is None:
            return True
        try:  # O_EXCL: of every process sharing the directory, exactly one creates the marker
            os.close(os.open(self.once_dir / f"{kind}@{step}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            self.armed.pop(kind)  # someone else's; never ask the file system again
            return False
        return True


def faults_from_env() -> Faults:
    return Faults.from_env()
