"""Link emulation on loopback: bandwidth and latency of a slow link, for tests and benchmarks.

A LinkShaper is one direction of one link. Bytes queue on it as on a serial line: a message
of n bytes occupies the line for n * 8 / bandwidth seconds after whatever was queued before
it, and each piece reaches the other end `latency` seconds after its last bit left. The
sender awaits each piece's arrival time before handing it to gRPC, so the receiver sees the
bytes when a real link would deliver them; concurrent messages share the line in FIFO order.
Only the stage activations and gradients are shaped (not control traffic or state copies).
"""

from __future__ import annotations

import asyncio


class LinkShaper:
    """One direction of an emulated link: `mbit` Mbit/s (0: unlimited) and `latency_ms` one way."""

    def __init__(self, mbit: float, latency_ms: float):
        if mbit < 0 or latency_ms < 0:
            raise ValueError(f"link emulation needs mbit >= 0 and latency_ms >= 0, got {mbit}, {latency_ms}")
        self.bits_per_s = mbit * 1e6
        self.latency_s = latency_ms / 1e3
        self._free_at = 0.0  # loop time at which the line has sent everything queued so far
        self.bytes = 0  # bytes that crossed this direction

    def schedule(self, sizes: list[int], start: float | None = None) -> list[float]:
        """Queue one message made of pieces of `sizes` bytes, handed to the link at event-loop
        time `start` (default: now); return each piece's arrival time. The message is queued
        whole, at once, as a sender streaming it would."""
        now = asyncio.get_running_loop().time() if start is None else start
        t = max(now, self._free_at)
        arrivals = []
        for n in sizes:
            if self.bits_per_s > 0:
                t += n * 8 / self.bits_per_s
            arrivals.append(t + self.latency_s)
        self._free_at = t
        self.bytes += sum(sizes)
        return arrivals

    @staticmethod
    async def until(arrival: float) -> None:
        delay = arrival - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def deliver(self, nbytes: int) -> None:
        """Queue one message of `nbytes` and wait until it has arrived."""
        await self.until(self.schedule([nbytes])[0])
