"""Worker rows as the scheduler sees them (WorkerView), and a vacancy pricer built only when a
fill first needs one. Used by the planner (planning.py)."""

from __future__ import annotations

import math
from typing import Callable

from ..scheduler import WorkerView
from ..vacancy_choice import ReplicaPricer
from .stored_values import stored_json


def worker_view(row, averaging_gbps: float = math.inf) -> WorkerView:
    """A worker row as the scheduler sees it (averaging_gbps: Measurements.averaging_gbps's figure
    for it, if it has averaged)."""
    device = stored_json(row["device"], {}, "workers.device")
    # One block of the run's model, measured, beats a square matmul's peak (see worker/probe.py)
    rate = device.get("block_tflops") or device.get("matmul_tflops", 0.0)
    return WorkerView(row["id"], row["address"], float(rate), float(device.get("memory_bytes", 0)) / 1e9, row["stage"],
                      averaging_gbps, float(device.get("head_tflops") or 0.0))


class LazyPricer:
    """A ReplicaPricer over the live workers and links, made at its first use (most fills find no
    stage short, or price nothing)."""

    def __init__(self, make: Callable[[], ReplicaPricer]):
        self.make, self.pricer = make, None

    def get(self) -> ReplicaPricer:
        if self.pricer is None:
            self.pricer = self.make()
        return self.pricer
