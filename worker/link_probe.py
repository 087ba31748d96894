"""Link measurements the scheduler asks for: latency and bandwidth to other stage servers.

The coordinator names, in RunState.measure_links, the stage addresses whose link from this
worker a plan needs and nobody measured recently. The worker measures them one at a time in
the background (a probe is an empty round trip, then PROBE_BYTES of payload, best of
PROBE_REPEATS), and the results ride on the next heartbeat. Bounded work: one probe in
flight, each address at most once per max_age_s, at most PROBE_BYTES x PROBE_REPEATS bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from gptjt_core.background import start_background
from gptjt_core.wire_checks import MAX_LINKS

from .transport import StageClient

log = logging.getLogger("gptjt.worker")

PROBE_BYTES = 256 * 1024  # large enough that bandwidth shows on a slow link, small next to a micro-batch
PROBE_REPEATS = 2


class LinkProber:
    """Measures the links the coordinator asks about, one at a time, in the background."""

    def __init__(self, client: StageClient, max_age_s: float):
        self.client = client
        self.max_age_s = max_age_s
        self.measured_at: dict[str, float] = {}  # address -> unix time of its last measurement
        self.results: list[dict] = []  # measured, not yet sent on a heartbeat
        self._task: asyncio.Task | None = None

    def request(self, addresses: list[str]) -> None:
        """Measure what the coordinator asked for, unless it was measured recently or a
        measurement is already running (the coordinator asks again while it is missing)."""
        if self._task is not None and not self._task.done():
            return
        now = time.time()
        todo = [a for a in addresses if now - self.measured_at.get(a, 0.0) > self.max_age_s]
        if todo:
            self._task = start_background(self._measure_all(todo), "link probes", log)

    def take(self) -> list[dict]:
        """Measurements for the next heartbeat: at most MAX_LINKS (the coordinator's cap); the rest wait."""
        out, self.results = self.results[:MAX_LINKS], self.results[MAX_LINKS:]
        return out

    async def _measure_all(self, addresses: list[str]) -> None:
        for address in addresses:
            try:
                rtt, transfer = min([await self.client.probe(address, PROBE_BYTES) for _ in range(PROBE_REPEATS)],
                                    key=lambda r: r[1])
            except grpc.aio.AioRpcError as e:
                log.info("link probe to %s failed (%s); the coordinator will ask again", address, e.code().name)
                continue
            mbit = link_mbit(rtt, transfer)
            if mbit is None:
                log.info("link probe to %s timed nothing (round trip %.3g s, transfer %.3g s); the coordinator will "
                         "ask again", address, rtt, transfer)
                continue
            self.measured_at[address] = time.time()
            self.results.append({"address": address, "latency_ms": rtt / 2 * 1e3, "mbit": mbit,
                                 "measured_unix_s": self.measured_at[address]})
            log.debug("link to %s: %.2f ms one way, %.1f Mbit/s", address, rtt / 2 * 1e3, mbit)


def link_mbit(rtt_s: float, transfer_s: float) -> float | None:
    """Mbit/s from an empty round trip and a PROBE_BYTES round trip (seconds), or None when the
    clock saw no time pass (a coarse clock, a suspended process): no figure beats a wrong one.

    The payload's extra time over an empty round trip is its serialisation on the link. Within
    noise of the round trip (loopback, LAN) that difference means little: a quarter of the whole
    call bounds it, so a fast link reads as "at least" this fast."""
    serialisation = max(transfer_s - rtt_s, 0.25 * transfer_s)
    if not serialisation > 0 or rtt_s < 0:
        return None
    return PROBE_BYTES * 8 / serialisation / 1e6
