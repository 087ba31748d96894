"""Fault injection for tests and drills: GPTJT_FAULTS="kind@step[,kind@step...]".

Kinds:
  poison@N          multiply this replica's gradient at step N by 1e6 before it is contributed
                    (a byzantine or broken replica; the coordinator must refuse it)
  nan@N             put NaN in this replica's gradient at step N
  die-averaging@N   SIGKILL this process halfway through the matchmaking of its averaging round
                    at step N (its group is forming, and then it is gone)

Unset in normal runs; parsing is strict so a typo fails loudly instead of silently testing nothing.
"""

from __future__ import annotations

import os
import re

KINDS = ("poison", "nan", "die-averaging")


def parse_faults(text: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"([a-z-]+)@(\d+)", item)
        if m is None or m.group(1) not in KINDS:
            raise ValueError(f"GPTJT_FAULTS item {item!r} is invalid: expected KIND@STEP with KIND in {KINDS}")
        faults[m.group(1)] = int(m.group(2))
    return faults


def faults_from_env() -> dict[str, int]:
    return parse_faults(os.environ.get("GPTJT_FAULTS", ""))
