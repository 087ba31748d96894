"""Link measurements the scheduler asks for: latency and bandwidth to other stage servers.

The coordinator names, in RunState.measure_links, the stage addresses whose link from this
worker a plan needs and nobody measured recently. The worker measures them one at a time in
the background (a probe is an empty round trip, then PROBE_BYTES of payload, best of
PROBE_REPEATS; 4x the payload, up to MAX_PROBE_BYTES, while its time stays within round-trip
noise), and the results ride on the next heartbeat. Bounded work: one probe in flight, each
address at most once per max_age_s (a failed one again after RETRY_S while it is still asked
for), at most ~1.3 x MAX_PROBE_BYTES x PROBE_REPEATS bytes a probe. A figure that measured the
bandwidth, not only a lower bound of it (bandwidth_is_a_lower_bound), also goes to
`on_bandwidth`: the codec chooser, so that a slow link's first micro-batches already travel in
fewer bits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from gptjt_core.background import start_background
from gptjt_core.wire_checks import MAX_LINKS

from .service import MAX_PROBE_BYTES
from .transport import StageClient

log = logging.getLogger("gptjt.worker")

PROBE_BYTES = 256 * 1024  # large enough that bandwidth shows on a slow link, small next to a micro-batch
PROBE_REPEATS = 2
RETRY_S = 5.0  # between tries of a link whose probe failed (a peer still starting, or gone)


class LinkProber:
    """Measures the links the coordinator asks about, one at a time, in the background."""

    def __init__(self, client: StageClient, max_age_s: float,
                 on_bandwidth: Callable[[str, float], None] = lambda address, mbit: None):
        self.client = client
        self.on_bandwidth = on_bandwidth  # (address, Mbit/s) of each link whose bandwidth showed
        self.max_age_s = max_age_s
        self.measured_at: dict[str, float] = {}  # address -> unix time of its last measurement
        self.results: list[dict] = []  # measured, not yet sent on a heartbeat
        self.wanted: list[str] = []  # what the coordinator's newest RunState asks to measure
        self._task: asyncio.Task | None = None

    def request(self, addresses: list[str]) -> None:
        """Measure what the coordinator asks for now (every RunState names it, empty when nothing),
        unless measured within max_age_s. One task measures, and retries a failed probe every
        RETRY_S while it is still asked for: a RunState may not come again soon (a paused or
        waiting run changes nothing that would send one)."""
        self.wanted = list(addresses)
        if self._task is None or self._task.done():
            if self._todo():
                self._task = start_background(self._measure_wanted(), "link probes", log)

    def _todo(self) -> list[str]:
        now = time.time()
        return [a for a in self.wanted if now - self.measured_at.get(a, 0.0) > self.max_age_s]

    def take(self) -> list[dict]:
        """Measurements for the next heartbeat: at most MAX_LINKS (the coordinator's cap); the rest wait."""
        out, self.results = self.results[:MAX_LINKS], self.results[MAX_LINKS:]
        return out

    async def _measure_wanted(self) -> None:
        while todo := self._todo():
            failed = False
            for address in todo:
                if address in self.wanted:  # a newer RunState may have stopped asking
                    failed |= not await self._measure(address)
            if failed:
                await asyncio.sleep(RETRY_S)

    async def _measure(self, address: str) -> bool:
        """Probe one link; False when it could not be measured (it is tried again)."""
        payload = PROBE_BYTES
        try:
            while True:
                # Each repeat is an empty round trip, then a payload one; the best of each is kept
                # apart. The first empty one on a new channel also opens the connection (a TLS
                # handshake: tens of ms on loaded cores); paired with its own payload trip, it made
                # a 20 Mbit/s link read 36 (seen in a test).
                trips = [await self.client.probe(address, payload) for _ in range(PROBE_REPEATS)]
                rtt, transfer = min(t[0] for t in trips), min(t[1] for t in trips)
                if not bandwidth_is_a_lower_bound(rtt, transfer) or payload >= MAX_PROBE_BYTES:
                    break
                payload *= 4  # the payload's time was within round-trip noise: a larger one shows the bandwidth
        except grpc.aio.AioRpcError as e:
            log.info("link probe to %s failed (%s: %s); trying again in %.0f s while the coordinator asks",
                     address, e.code().name, e.details(), RETRY_S)
            return False
        mbit = link_mbit(rtt, transfer, payload)
        if mbit is None:
            log.info("link probe to %s timed nothing (round trip %.3g s, transfer %.3g s); trying again in %.0f s",
                     address, rtt, transfer, RETRY_S)
            return False
        self.measured_at[address] = time.time()
        if not bandwidth_is_a_lower_bound(rtt, transfer):
            self.on_bandwidth(address, mbit)
        self.results.append({"address": address, "latency_ms": rtt / 2 * 1e3, "mbit": mbit,
                             "measured_unix_s": self.measured_at[address]})
        log.debug("link to %s: %.2f ms one way, %.1f Mbit/s", address, rtt / 2 * 1e3, mbit)
        return True


def link_mbit(rtt_s: float, transfer_s: float, payload_bytes: int = PROBE_BYTES) -> float | None:
    """Mbit/s from an empty round trip and a `payload_bytes` round trip (seconds), or None when the
    clock saw no time pass (a coarse clock, a suspended process): no figure beats a wrong one.

    The payload's extra time over an empty round trip is its serialisation on the link. Within
    noise of the round trip (loopback, LAN) that difference means little: a quarter of the whole
    call bounds it, so a fast link reads as "at least" this fast."""
    serialisation = max(transfer_s - rtt_s, NOISE_SHARE * transfer_s)
    if not serialisation > 0 or rtt_s < 0:
        return None
    return payload_bytes * 8 / serialisation / 1e6


NOISE_SHARE = 0.25  # of a payload round trip: below it, the payload's extra time is round-trip noise


def bandwidth_is_a_lower_bound(rtt_s: float, transfer_s: float) -> bool:
    """Whether link_mbit's figure only says "at least this fast": the payload's extra time was
    within round-trip noise. A probe then grows its payload up to MAX_PROBE_BYTES: at
    PROBE_BYTES a 1 Gbit/s link 100 ms away reads "at least 82 Mbit/s", which would price it as a
    slow link in the scheduler's cost model; at 4 MiB it reads 1 Gbit/s. What stays a lower bound
    at 4 MiB is at least ~1.3 Gbit/s at 100 ms (less far, more): the coordinator gets it as the
    bandwidth, the codec chooser does not take it."""
    return transfer_s - rtt_s <= NOISE_SHARE * transfer_s
