"""The worker's local knobs (`gptjt-worker` flags); everything about the run comes from the coordinator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerOptions:
    """The worker's local knobs; everything about the run comes from the coordinator."""

    coordinator: str
    """host:port of the coordinator to join."""
    token: str = ""
    """The run's join token (from the operator)."""
    device: str = "cpu"
    """cpu or cuda:N."""
    listen: str = "127.0.0.1:0"
    """host:port to serve the stage API on (port 0: any free one)."""
    announce: str = ""
    """Address other workers use to reach this one (default: the listen address)."""
    relay: str = ""
    """host:port of the run's relay (coordinator.relay_listen): at start the worker asks it
    whether its address is reachable and, if not (NAT), serves its stage through it."""
    name: str = ""
    """A label for the operator (default: the host name)."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    drain_timeout_s: float = 60.0
    """Seconds to finish the current step on SIGTERM before handing tickets back."""
    tls_ca: str = ""
    """PEM root certificate to verify a TLS coordinator."""
    simulate_device: str = ""
    """TFLOPS:MEMORY_GB: report this device and compute at its pace (tests and benchmarks only)."""
