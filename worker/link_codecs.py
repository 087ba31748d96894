"""Per-link codec choice: fewer bits on a slow downstream link.

Every call down a link measures its throughput: payload bytes (both directions) over the
seconds the link took, i.e. the call's wall time minus the compute time the downstream stage
reports. That is an effective figure (latency and queueing behind other micro-batches count
against the link, as they do for training), smoothed per link. A link measured under
link.slow_link_mbit switches to the slow codecs; it must measure 25 % above that threshold
to switch back, so a link near the threshold does not flap.

Before its first call, a link is judged by the link probe's figure when there is one
(worker/link_probe.py: the coordinator asks a worker to measure the links a plan needs, so the
probe usually comes before the plan that uses the link). A probe measures bandwidth alone, with
latency taken out, so the call figure (latency in) is never above it: a link the probe finds slow
is slow from the first micro-batch on, instead of after a window at the default codecs. The first
call's figure replaces the probe's. Links with neither figure use the run's default codecs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gptjt_core.config import LinkConfig, PipelineConfig

log = logging.getLogger("gptjt.worker")

SMOOTHING = 0.3  # weight of the newest measurement
HYSTERESIS = 1.25  # a slow link is fast again above this factor times the threshold
PROBED_KEPT = 64  # probe figures kept for links with no call yet (the newest; a probe request names <= 8)


@dataclass
class _Link:
    """The measured throughput of one downstream link and the codecs chosen for it."""
    mbit: float = 0.0  # EWMA of measured Mbit/s; 0 until measured
    slow: bool = False


class LinkCodecChooser:
    """Per downstream link: the activation and gradient codecs, switched to fewer bits on a link measured slow."""

    def __init__(self, pipeline: PipelineConfig, link: LinkConfig):
        self.default = (pipeline.activation_codec, pipeline.gradient_codec)
        self.slow = (link.slow_activation_codec, link.slow_gradient_codec)
        self.adaptive = link.adaptive_codecs
        self.threshold = link.slow_link_mbit
        self.links: dict[str, _Link] = {}  # downstream links measured by calls
        # Mbit/s the link probe measured, by address, newest last: kept across plans (a probe is
        # asked for before the plan that uses the link arrives), bounded by PROBED_KEPT
        self.probed: dict[str, float] = {}
        self.downstream: list[str] = []  # the plan's next-stage addresses (forget_except)

    def codecs(self, address: str) -> tuple[str, str]:
        """(activation codec, gradient codec) for the next micro-batch sent to `address`."""
        return self.slow if self.adaptive and self._slow(address) else self.default

    def _slow(self, address: str) -> bool:
        link = self.links.get(address)
        if link is not None:
            return link.slow
        probed = self.probed.get(address)
        return probed is not None and probed < self.threshold

    def probe_measured(self, address: str, mbit: float) -> None:
        """The link probe measured `mbit` Mbit/s of bandwidth to `address` (latency taken out)."""
        if not mbit > 0:
            return
        was_slow = self._slow(address)
        self.probed.pop(address, None)
        self.probed[address] = mbit
        if self.adaptive and self._slow(address) != was_slow:  # only a link no call has measured yet
            log.info("link to %s: the probe measured %.3g Mbit/s against link.slow_link_mbit %.3g: %s codecs "
                     "until calls measure it", address, mbit, self.threshold, "/".join(self.codecs(address)))
        while len(self.probed) > PROBED_KEPT:
            del self.probed[next(iter(self.probed))]

    def observe(self, address: str, nbytes: int, link_seconds: float) -> None:
        """A call to `address` moved `nbytes` of payload in `link_seconds` of link time."""
        if nbytes <= 0 or link_seconds <= 0:
            return
        mbit = nbytes * 8 / link_seconds / 1e6
        if address not in self.links:  # its first call: a link the probe found slow switches back as any slow one
            self.links[address] = _Link(slow=self._slow(address))
        link = self.links[address]
        link.mbit = mbit if link.mbit == 0 else (1 - SMOOTHING) * link.mbit + SMOOTHING * mbit
        if link.slow:
            link.slow = link.mbit < self.threshold * HYSTERESIS
        else:
            link.slow = link.mbit < self.threshold

    def forget_except(self, addresses: list[str]) -> None:
        """Drop call measurements of links no longer in the plan (`addresses`: its next stage's).
        Probe figures stay: they may be of the next plan's links."""
        self.links = {a: link for a, link in self.links.items() if a in addresses}
        self.downstream = list(addresses)

    def metrics(self) -> dict:
        """The slowest measured downstream link (by calls, else by the probe), and the codecs it
        uses now (for heartbeats)."""
        measured = [(link.mbit, a) for a, link in self.links.items() if link.mbit > 0]
        measured += [(self.probed[a], a) for a in self.downstream if a not in self.links and a in self.probed]
        if not measured:
            return {"downstream_mbit": 0.0, "activation_codec": self.default[0], "gradient_codec": self.default[1]}
        mbit, address = min(measured)
        act, grad = self.codecs(address)
        return {"downstream_mbit": mbit, "activation_codec": act, "gradient_codec": grad}
