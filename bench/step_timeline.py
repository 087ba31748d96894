"""Where a pipelined step's time goes, read from a finished run's ledger (run.db in its workdir).

A step of n micro-batches through a 2-stage pipeline takes n periods of its slowest resource plus
a bubble: the first micro-batch's trip through an empty pipeline (stage 0's forward, the link,
the last stage's forward and backward, the link back, stage 0's backward: the fill and drain),
and the tail from the last commit to the close (the members' reports, the optimizer step, the
coordinator's phase changes). Stage 0 commits a ticket when its backward is done, so:

  period_s        median gap between two commits of one step: the pipeline's throughput
  first_commit_s  median time from a step's open to its first commit
  tail_s          median time from a step's last commit to its close
  bubble_s        median step time minus n x period_s
"""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
from pathlib import Path


def step_timeline(workdir: Path, skip: int = 1) -> dict:
    """The figures above over the closed steps after the first `skip` (loading, warm-up), each
    step's final attempt."""
    with contextlib.closing(sqlite3.connect(f"file:{workdir / 'run.db'}?mode=ro", uri=True)) as db:
        steps = db.execute("SELECT step, attempts - 1, opened, closed FROM steps WHERE step >= ? ORDER BY step",
                           (skip,)).fetchall()
        commits = {(s, a): [] for s, a, _, _ in steps}
        for step, attempt, at in db.execute("SELECT step, attempt, committed_at FROM tickets WHERE step >= ? AND "
                                            "committed_at IS NOT NULL ORDER BY committed_at", (skip,)):
            if (step, attempt) in commits:
                commits[(step, attempt)].append(at)
    if not steps or any(not c for c in commits.values()):
        raise ValueError(f"no closed step after step {skip} with its commits in {workdir / 'run.db'}: run more steps")
    gaps = [b - a for c in commits.values() for a, b in zip(c, c[1:])]
    n = statistics.median(len(c) for c in commits.values())
    period = statistics.median(gaps) if gaps else 0.0
    step_s = statistics.median(closed - opened for _, _, opened, closed in steps)
    return {
        "period_s": period,
        "first_commit_s": statistics.median(commits[(s, a)][0] - opened for s, a, opened, _ in steps),
        "tail_s": statistics.median(closed - commits[(s, a)][-1] for s, a, _, closed in steps),
        "bubble_s": step_s - n * period,
        "micro_batches": n,
    }
