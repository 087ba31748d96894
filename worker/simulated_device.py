"""A simulated device for tests and benchmarks: report chosen capabilities, compute at their pace.

`gptjt-worker --simulate-device TFLOPS:MEMORY_GB` makes one CPU worker stand in for a GPU
of another size: the worker reports `TFLOPS` and `MEMORY_GB` instead of probing, and every
forward/backward takes at least the time that device would need for the stage's model
FLOPs (2 x matmul params x tokens forward, 4 x backward), sleeping off the difference. The
real CPU must be faster than the simulated rate for the pace to be exact (the worker warns
when it is not). Not for real runs: a volunteer's real device is always probed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("gptjt.worker")


@dataclass(frozen=True)
class SimulatedDevice:
    """A device this worker pretends to be (tests and benchmarks): its rate and memory."""
    tflops: float  # model TFLOP/s the worker computes at
    memory_gb: float  # 1e9 bytes the worker reports

    @staticmethod
    def parse(text: str) -> SimulatedDevice:
        """'0.02:24' -> 0.02 TFLOP/s, 24 GB."""
        try:
            tflops, memory = (float(v) for v in text.split(":"))
        except ValueError:
            raise ValueError(f"--simulate-device {text!r}: expected TFLOPS:MEMORY_GB, e.g. 0.02:24") from None
        if not (tflops > 0 and memory > 0):
            raise ValueError(f"--simulate-device {text!r}: both figures must be > 0")
        return SimulatedDevice(tflops, memory)

    def device_info(self, dtype: str) -> dict:
        return {"kind": "simulated", "name": f"simulated {self.tflops:g} TFLOP/s {self.memory_gb:g} GB",
                "memory_bytes": int(self.memory_gb * 1e9), "matmul_tflops": self.tflops, "dtype": dtype}


class ComputePacer:
    """Holds each forward/backward of a stage to the simulated device's pace."""

    def __init__(self, device: SimulatedDevice, matmul_params: int):
        self.seconds_per_flop = 1.0 / (device.tflops * 1e12)
        self.matmul_params = matmul_params  # the embedding is a lookup: no FLOPs
        self._warned = False

    def hold(self, passes: int, tokens: int, started: float) -> None:
        """`passes`: 2 forward, 4 backward, 6 both (x matmul params x tokens FLOPs)."""
        due = started + passes * self.matmul_params * tokens * self.seconds_per_flop
        left = due - time.perf_counter()
        if left > 0:
            time.sleep(left)
        elif not self._warned and left < -0.01:
            self._warned = True
            log.warning("simulated device is faster than this machine computes: a pass ran %.0f ms over "
                        "its simulated time", -left * 1e3)
