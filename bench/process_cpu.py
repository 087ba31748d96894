"""Where a benchmark's CPU went: cores used by groups of processes over a window, read from /proc.

bench heartbeat runs a coordinator and the 10,000 simulated workers that load it on the same
cores, so its round trips wait on both. Sampled once a second from a thread of the bench's own
process, the CPU time of each process (utime + stime, /proc/PID/stat) and the machine's busy
time (/proc/stat) say, for the window the figure covers, how many cores the coordinator, its
status process and the load generators used, and how busy the machine was. Linux only: where
/proc is missing the figures are None.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads) so far; None if it is gone."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime (fields 14 and 15 of stat)


def children(pid: int) -> list[int]:
    """The processes `pid` started that are alive (every thread's children: /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs so far (/proc/stat's first line; idle and iowait are not busy)."""
    try:
        values = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


class ProcessCpu:
    """Samples every `period_s` the CPU seconds of the processes `groups()` names ({group: pids},
    asked again at each sample so processes started later are counted) until `stop()`."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]], period_s: float = 1.0):
        self.groups, self.period_s = groups, period_s
        # (monotonic s, {group: {pid: cpu s}}, machine (busy, total) jiffies)
        self.samples: list[tuple[float, dict[str, dict[int, float]], tuple[int, int] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="process-cpu")
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.period_s):
                return

    def _sample(self) -> None:
        now, machine = time.monotonic(), machine_jiffies()
        groups = {}
        for group, pids in self.groups().items():
            groups[group] = {pid: s for pid in pids if (s := cpu_seconds(pid)) is not None}
        self.samples.append((now, groups, machine))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def cores(self, start: float, end: float) -> dict[str, float | None]:
        """Cores each group used between the first sample at or after `start` and the last at or
        before `end` (monotonic seconds), and `machine_busy`: cores of the whole machine that were
        busy. A process is counted over the part of the window it lived through both samples of.
        None where the window holds fewer than two samples or /proc is missing."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        names = {g for s in self.samples for g in s[1]}
        if len(inside) < 2:
            return {**{g: None for g in sorted(names)}, "machine_busy": None}
        (t0, first, m0), (t1, last, m1) = inside[0], inside[-1]
        span = t1 - t0
        out: dict[str, float | None] = {}
        for group in sorted(names):
            before, after = first.get(group, {}), last.get(group, {})
            used = sum(after[pid] - before[pid] for pid in after if pid in before)
            out[group] = round(used / span, 3)
        busy = None
        if m0 is not None and m1 is not None and m1[1] > m0[1]:
            busy = round((m1[0] - m0[0]) / (m1[1] - m0[1]) * (os.cpu_count() or 1), 3)
        out["machine_busy"] = busy
        return out
