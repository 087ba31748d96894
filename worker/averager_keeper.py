"""The hivemind averager of the stage this worker holds: one per stage and layer range, kept fresh.

Built when the stage loads (bootstrapped from the DHT peers the coordinator names at that
moment: its own and live workers'), rebuilt when the layer range changes (its buffers have the
old range's shapes and its group key the old range) or when rounds keep failing (a peer cut off
from the others finds them again), and dropped when the worker goes back to standby.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch

from gptjt_core.config import RunConfig
from gptjt_core.dht_auth import DhtCredentials, DhtToken
from gptjt_core.model import StageSpec
from gptjt_proto import coordinator_pb2 as cpb

log = logging.getLogger("gptjt.worker")


def dht_credentials(key_der: bytes, reply: cpb.JoinReply) -> DhtCredentials | None:
    """This worker's access to the run's DHT: its key and the token Join returned for it (None
    when the run has no replicas, and so no DHT)."""
    if not reply.dht_authority_key:
        return None
    t = reply.dht_token
    return DhtCredentials(key_der, DhtToken(t.username, t.public_key, t.expiration_time, t.signature),
                          reply.dht_authority_key)


class AveragerKeeper:
    """Builds, rebuilds and drops the averager of the stage this worker holds."""

    def __init__(self, run: RunConfig, host: str, on_built: Callable[[], None],
                 credentials: DhtCredentials | None = None):
        """host: the IP the averager's DHT peer listens on; on_built: called when a new averager is
        up (its DHT address should reach the coordinator now, for others to bootstrap from);
        credentials: this worker's access to the run's DHT (from Join)."""
        self.run, self.host, self.on_built = run, host, on_built
        self.credentials = credentials
        self.averager = None  # worker.averaging.StageAverager
        self.error = ""  # why the last attempt to start one failed
        self.failed_rounds = 0  # in a row, since it was built
        self._bytes_before = 0  # sent by averagers of ranges this worker held earlier

    def fits(self, stage: int, spec: StageSpec) -> bool:
        return self.averager is not None and self.averager.key == (stage, spec.start, spec.end)

    async def build(self, stage: int, spec: StageSpec, shapes: list[torch.Size], peers: list[str]) -> None:
        """Start an averager for this stage and range; on failure keep the reason in `error` (the
        next round reports it and tries again)."""
        from .averaging import StageAverager

        avg = self.run.averaging
        try:
            self.averager = await asyncio.to_thread(
                StageAverager, peers, self.run.name, stage, shapes, max_group=self.run.pipeline.replicas_per_stage,
                compression=avg.compression, matchmaking_s=avg.matchmaking_s, timeout=avg.timeout_s, host=self.host,
                layers=(spec.start, spec.end), credentials=self.credentials)
        except RuntimeError as e:
            self.error = str(e)
            log.error("could not start the averager of stage %d: %s; trying again at the next round", stage, e)
            return
        self.error, self.failed_rounds = "", 0
        self.on_built()

    async def drop(self) -> None:
        if self.averager is not None:
            averager, self.averager = self.averager, None
            self._bytes_before += averager.bytes_sent
            await asyncio.to_thread(averager.shutdown)

    def round_failed(self, group_formed: bool = False) -> bool:
        """Count a failed round; True when averaging.rebuild_after_failures failed in a row
        without a group. A round whose group formed (parts lost, a group refused) shows this peer
        reaches the others: rebuilding would only take it away from them for the seconds a new
        averager needs (replicas rebuilding at alternating times failed each other's rounds in CI)."""
        if group_formed:
            self.failed_rounds = 0
            return False
        self.failed_rounds += 1
        return self.failed_rounds >= self.run.averaging.rebuild_after_failures

    def round_succeeded(self) -> None:
        self.failed_rounds = 0

    @property
    def bytes_sent(self) -> int:
        """Tensor bytes every averager of this worker has sent."""
        return self._bytes_before + (self.averager.bytes_sent if self.averager is not None else 0)

    @property
    def maddrs(self) -> list[str]:
        """Multiaddrs of the averager's DHT peer (heartbeats carry them)."""
        return self.averager.visible_maddrs if self.averager is not None else []
