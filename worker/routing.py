"""Choosing which replica of the next stage gets a micro-batch (SWARM-style load balancing).

Each candidate's expected wait is (its micro-batches in flight from us + 1) x its recent
round-trip time per micro-batch, an exponential moving average in seconds; the least
expected wait wins, so a fast replica takes more work and a queue that builds up on one
replica sends the next micro-batch elsewhere. A replica whose call failed is skipped until
the coordinator's next plan (which drops it if it is dead).

In averaging.mode "local-steps" (DiLoCo-style) every replica trains on its own between outer
steps, so the replicas of a stage drift apart, and a micro-batch must go through one fixed
chain of replicas: a lane, the i-th member of each stage, as DiLoCo's replicas are whole models.
Load-balanced across replicas that hold different parameters, each stage learned from
activations and gradients of models it was not paired with (bench gradsync, one quick-form
swarm each against train-local: a loss gap of 1.15 % load-balanced, 0.54 % in lanes). The lane
partner is chosen while it answers; when it has failed the least expected wait picks another
(a step that mixes lanes beats one that stalls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


RETRY_AFTER_S = 5.0
# A call to the next stage gets a deadline of CALL_FACTOR x the replica's measured round trip x
# the micro-batches in flight to it, at least CALL_FLOOR_S (a first call pays channel set-up and
# the stages after it warming up): a peer that hangs (frozen, partitioned) frees the caller.
CALL_FLOOR_S, CALL_FACTOR = 60.0, 10.0


class NoReplicaAvailable(RuntimeError):
    """Every replica of the next stage failed or none is assigned."""


@dataclass
class _Replica:
    """What the router knows of one replica of the next stage."""
    address: str
    in_flight: int = 0
    seconds: float = 0.0  # EWMA round trip per micro-batch; 0 until measured
    failed_at: float | None = None  # time.monotonic() of its last failure

    @property
    def failed(self) -> bool:
        # A failed replica is retried after RETRY_AFTER_S even if the plan does not change: the
        # coordinator keeps a replica that still answers its probe, and the error may have passed.
        return self.failed_at is not None and time.monotonic() - self.failed_at < RETRY_AFTER_S


@dataclass
class NextStageRouter:
    """Picks the replica of the next stage a micro-batch goes to: least expected wait (in flight x round
    trip), skipping ones that failed."""
    smoothing: float = 0.3
    """Weight of the newest round trip in the moving average."""
    replicas: dict[str, _Replica] = field(default_factory=dict)
    lane: str | None = None
    """The next-stage replica every micro-batch goes to while it answers (lane_partner); None: any."""

    def update(self, addresses: list[str], forgive: bool, lane: str | None = None) -> None:
        """The coordinator's current list of next-stage replicas. forgive: a new plan, so replicas
        that failed get another chance (a dead one is no longer listed). lane: see `lane`."""
        self.replicas = {a: self.replicas.get(a) or _Replica(a) for a in addresses}
        self.lane = lane if lane in self.replicas else None
        if forgive:
            for r in self.replicas.values():
                r.failed_at = None

    def pick(self) -> str:
        partner = self.replicas.get(self.lane) if self.lane is not None else None
        if partner is not None and not partner.failed:
            partner.in_flight += 1
            return partner.address
        live = [r for r in self.replicas.values() if not r.failed]
        if not live:
            raise NoReplicaAvailable(f"no live replica of the next stage among {sorted(self.replicas)}")
        measured = [r.seconds for r in live if r.seconds > 0]
        default = min(measured) if measured else 1.0  # unmeasured replicas look as fast as the best
        best = min(live, key=lambda r: ((r.in_flight + 1) * (r.seconds or default), r.in_flight, r.address))
        best.in_flight += 1
        return best.address

    def done(self, address: str, started: float, ok: bool) -> None:
        """Record the end of a call to `address` that began at time.monotonic() `started`."""
        r = self.replicas.get(address)
        if r is None:
            return
        r.in_flight = max(0, r.in_flight - 1)
        if ok:
            elapsed = time.monotonic() - started
            r.seconds = elapsed if r.seconds == 0 else (1 - self.smoothing) * r.seconds + self.smoothing * elapsed
        else:
            r.failed_at = time.monotonic()

    def deadline_s(self, address: str) -> float:
        """How long a call to `address` may take before it is given up (see CALL_FACTOR)."""
        r = self.replicas.get(address)
        if r is None or r.seconds == 0:
            return CALL_FLOOR_S
        return max(CALL_FLOOR_S, CALL_FACTOR * r.seconds * max(1, r.in_flight))

    def release(self, address: str) -> None:
        """A call to `address` that ended before it said anything about the replica."""
        r = self.replicas.get(address)
        if r is not None:
            r.in_flight = max(0, r.in_flight - 1)

    @property
    def available(self) -> bool:
        return any(not r.failed for r in self.replicas.values())


def lane_partner(worker_id: str, assignment, mode: str) -> str | None:
    """The address of this worker's lane partner in the next stage (mode "local-steps"), else None.

    assignment: a StageAssignment (peer_ids: this stage's members, next_ids / next_addresses: the
    next stage's). The i-th of this stage's members, by worker id, pairs with the i-th of the
    next stage's. Only when both stages have as many members: with fewer next, lanes would share
    a replica there anyway; with more, the extra ones would train on nothing and their zero
    pseudo-gradients would dilute the outer step's mean. Such a step load-balances as before."""
    if mode != "local-steps" or worker_id not in assignment.peer_ids \
            or len(assignment.next_ids) != len(assignment.peer_ids):
        return None
    by_id = dict(zip(assignment.next_ids, assignment.next_addresses))
    return by_id[sorted(by_id)[sorted(assignment.peer_ids).index(worker_id)]]
