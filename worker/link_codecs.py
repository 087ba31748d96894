"""Per-link codec choice: fewer bits on a slow downstream link.

Every call down a link measures its throughput: payload bytes (both directions) over the
seconds the link took, i.e. the call's wall time minus the compute time the downstream stage
reports. That is an effective figure (latency and queueing behind other micro-batches count
against the link, as they do for training), smoothed per link. A link measured under
link.slow_link_mbit switches to the slow codecs; it must measure 25 % above that threshold
to switch back, so a link near the threshold does not flap. Unmeasured links use the run's
default codecs (the first micro-batches measure them).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptjt_core.config import LinkConfig, PipelineConfig

SMOOTHING = 0.3  # weight of the newest measurement
HYSTERESIS = 1.25  # a slow link is fast again above this factor times the threshold


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
        self.links: dict[str, _Link] = {}

    def codecs(self, address: str) -> tuple[str, str]:
        """(activation codec, gradient codec) for the next micro-batch sent to `address`."""
        link = self.links.get(address)
        return self.slow if self.adaptive and link is not None and link.slow else self.default

    def observe(self, address: str, nbytes: int, link_seconds: float) -> None:
        """A call to `address` moved `nbytes` of payload in `link_seconds` of link time."""
        if nbytes <= 0 or link_seconds <= 0:
            return
        mbit = nbytes * 8 / link_seconds / 1e6
        link = self.links.setdefault(address, _Link())
        link.mbit = mbit if link.mbit == 0 else (1 - SMOOTHING) * link.mbit + SMOOTHING * mbit
        if link.slow:
            link.slow = link.mbit < self.threshold * HYSTERESIS
        else:
            link.slow = link.mbit < self.threshold

    def forget_except(self, addresses: list[str]) -> None:
        """Drop measurements of links no longer in the plan."""
        self.links = {a: link for a, link in self.links.items() if a in addresses}

    def metrics(self) -> dict:
        """The slowest measured downstream link, and the codecs it uses now (for heartbeats)."""
        measured = [(link.mbit, a) for a, link in self.links.items() if link.mbit > 0]
        if not measured:
            return {"downstream_mbit": 0.0, "activation_codec": self.default[0], "gradient_codec": self.default[1]}
        mbit, address = min(measured)
        act, grad = self.codecs(address)
        return {"downstream_mbit": mbit, "activation_codec": act, "gradient_codec": grad}
