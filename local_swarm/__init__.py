"""A swarm on this machine: the real coordinator and workers as child processes on loopback.

The demo, the benchmarks, the tests and the chaos soak all start swarms through this one
launcher. It imports the coordinator and worker packages only to create join tokens and read
status; every process it starts is a console script (`gptjt-coordinator`, `gptjt-worker`).
"""

from .process import BIN, SwarmProcess, free_port
from .run_toml import small_run_toml
from .swarm import LocalSwarm, SwarmFailed

__all__ = ["BIN", "LocalSwarm", "SwarmFailed", "SwarmProcess", "free_port", "small_run_toml"]
