"""What each worker is told on its Watch stream: its stage, peers, next hop, and where the run stands.

Read-only views over the stores; the gRPC server turns them into StageAssignment and RunState.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .db import ALIVE_STATES
from .history import StepHistory
from .loss_scaling import LossScaleBook
from .measurements import Measurements
from .planning import StagePlanner
from .step_state import APPLYING, DONE, StepState
from .workers import WorkerRegistry


@dataclass(frozen=True)
class RunFacts:
    """What every worker's assignment and RunState read, read once per state of the ledger: a
    change wakes every Watch stream at once, and with thousands of workers each reading the
    worker table for itself would be O(workers^2)."""

    common: dict  # the RunState fields that are the same for every worker
    by_stage: dict[int, list]  # stage -> live worker rows, oldest first
    members: dict[int, list[str]]
    contributors: dict[str, list[str]]
    drains: frozenset[str]
    standby_why: dict[str, str]  # worker id -> why it has no stage
    verifiers_of: dict[str, list[str]]  # checked worker -> standbys holding a pending check of its work
    newest_check: dict[str, int]  # verifier -> id of its newest pending spot check of this restore epoch
    holder_key: tuple[int, int, str]  # (restore_epoch, step, phase): what is_holder compares with
    # StepHistory.attested(): (last closed step + 1, {stage: ((start, end), digests its members reported)})
    attested: tuple[int, dict[int, tuple[tuple[int, int], tuple[str, ...]]]] = (0, {})

    def is_holder(self, row) -> bool:
        """StepState.is_holder against these facts."""
        epoch, step, phase = self.holder_key
        return (row["state"] in ("ready", "draining") and row["loaded_epoch"] == epoch
                and row["position"] in (step, step + 1) and (row["position"] == step or phase == APPLYING))


# RunState fields every worker gets that a standby acts on: a pause and the state to restore.
# Not plan_version: it also moves whenever a placed worker reports another state, loaded epoch
# or position (RunLedger.heartbeat: reloading, ready again), which tells its peers, not a
# standby, anything; what of a plan a standby acts on is whether it is placed (standby_key).
_STANDBY_FIELDS = ("paused", "restore_epoch", "restore_step", "restore_from_store")
# What of a RunState (run_state(), plus the server's dht_peers) a standby acts on besides those:
# its assignment (being placed, why not), a drain, the links to measure, a spot check to ask
# for, the run's DHT. Not the step's progress: refreshes that find only that moved send nothing.
_STANDBY_STATE_FIELDS = _STANDBY_FIELDS + ("assignment", "drain", "measure_links", "newest_check", "dht_peers")


def standby_view(state: dict) -> tuple:
    """What of a standby worker's RunState it acts on, and whether the run is over: between two
    standby states a Watch stream sends the second only if this moved (coordinator/watch_streams.py)."""
    return tuple(state.get(k) for k in _STANDBY_STATE_FIELDS) + (state["phase"] == DONE,)


class AssignmentView:
    """Each worker's StageAssignment and RunState, read from the stores."""

    def __init__(self, state: StepState, workers: WorkerRegistry, planner: StagePlanner, measurements: Measurements,
                 loss_scales: LossScaleBook, history: StepHistory):
        self.state, self.workers, self.planner, self.measurements = state, workers, planner, measurements
        self.loss_scales, self.history = loss_scales, history
        self._attested: tuple[tuple, tuple] | None = None  # ((step, restore epoch), StepHistory.attested())
        self._facts: tuple[tuple, RunFacts] | None = None
        self._live: tuple[tuple, list] | None = None
        self._to_rank: tuple | None = None  # (live list, candidates, by stage, rows): _link_targets

    def facts(self) -> RunFacts:
        key = self.workers.db.changes()
        if self._facts is None or self._facts[0] != key:
            st = self.state
            common = {"step": st.step, "attempt": st.attempt, "phase": st.phase,
                      "global_grad_norm": st.grad_norm if st.phase == APPLYING else 0.0,
                      "plan_version": st.plan_version, "paused": st.paused, "restore_epoch": st.restore_epoch,
                      "restore_step": st.restore_step, "restore_from_store": st.restore_from_store,
                      "loss_scale": self.loss_scales.of_attempt(st.step, st.attempt) or 1.0}
            self._facts = key, RunFacts(common, self.workers.stage_workers(), st.members(), st.contributors(),
                                        frozenset(st.drains()), self.planner.standby_reasons(),
                                        self._verifiers_of(), self._newest_check(st.restore_epoch),
                                        (common["restore_epoch"], common["step"], common["phase"]),
                                        self._attested_digests(common["step"], common["restore_epoch"]))
        return self._facts[1]

    def _attested_digests(self, step: int, epoch: int) -> tuple:
        """StepHistory.attested(), read again only when a step closes or the run restores."""
        if self._attested is None or self._attested[0] != (step, epoch):
            self._attested = (step, epoch), self.history.attested()
        return self._attested[1]

    def standby_key(self) -> tuple:
        """What a standby worker's RunState shows that it acts on (worker/runner.py: a restore, a
        pause, the run's end, a drain, whether it is placed, why not, the links it is to measure),
        without the step's progress or the placed workers' own progress (nor the stages' ranges,
        which standby_view does not send either: a wake for them would read and send nothing):
        Watch streams of standbys wake only when this changes (coordinator/watch_streams.py).
        Read once per ledger state. (With plan_version in it, one bump of it in the window of
        `gptjt bench heartbeat`, where no placement changed, woke 9,891 standbys on 2026-12-07,
        and the window's slowest round trips fell while their reads went out.)"""
        facts = self.facts()
        common = facts.common
        return (tuple(common[k] for k in _STANDBY_FIELDS), common["phase"] == DONE, facts.drains,
                tuple((stage, tuple(w["id"] for w in rows)) for stage, rows in sorted(facts.by_stage.items())),
                facts.standby_why, self.planner.scheduling(), self.workers.db.meta("link_candidates"))

    def _verifiers_of(self) -> dict[str, list[str]]:
        """Checked worker -> the standbys with a pending check of its work (ledger/spot_checks.py:
        a check with weights from the store or the model source): they, and only they, may fetch
        that worker's evidence."""
        out: dict[str, list[str]] = {}
        for worker, peers in self.workers.db.execute(
                "SELECT worker, peers FROM checks WHERE kind='recompute' AND verdict='pending' AND weights IS NOT NULL"):
            for verifier in json.loads(peers):
                if verifier not in out.setdefault(worker, []):
                    out[worker].append(verifier)
        return out

    def _newest_check(self, epoch: int) -> dict[str, int]:
        """Verifier -> the id of its newest pending spot check of restore epoch `epoch` (what
        SpotCheckBook.pending_for hands it): its RunState carries the id, so a check reaches a
        placed verifier with the Watch read that the check's own transaction wakes, not with its
        next heartbeat (2 s away; a tiny step lasts ~1 s, and a check must be made while the
        verifier keeps that step's weights). One read per ledger state, over the index of
        pending checks."""
        return {json.loads(peers)[0]: newest for peers, newest in self.workers.db.execute(
            "SELECT peers, MAX(id) FROM checks WHERE verdict='pending' AND kind='recompute' AND epoch=? "
            "GROUP BY peers", (epoch,))}

    def live_addresses(self) -> list:
        """(id, address, stage) of every live worker, oldest first; read again only after a write
        that changes them (WorkerRegistry.roster_version), and only when a plan measures links (it is
        every worker)."""
        key = self.workers.roster_version, self.workers.db.rollbacks
        if self._live is None or self._live[0] != key:
            self._live = key, self.workers.addresses()
        return self._live[1]

    def _link_targets(self, candidates: frozenset[str]) -> tuple[dict[int, list], list]:
        """The live workers a link request ranks (Measurements.to_measure): the candidates among
        them (all of them when there are none), by stage and oldest first. Kept until the roster or
        the candidates change: each candidate's request scanned every live worker, ~1,000 rows,
        and bench churn makes ~14,000 such requests an hour."""
        live = self.live_addresses()
        kept = self._to_rank
        if kept is None or kept[0] is not live or kept[1] != candidates:
            rows = [r for r in live if r["id"] in candidates] if candidates else live
            by_stage: dict[int, list] = {}
            for r in rows:
                if r["stage"] >= 0:
                    by_stage.setdefault(r["stage"], []).append(r)
            kept = self._to_rank = live, candidates, by_stage, rows
        return kept[2], kept[3]

    def assignment(self, worker_id: str, row=None) -> dict:
        """The worker's stage (or standby), its peers, and where to send its activations (`row`:
        the worker's, if already read)."""
        plan, facts = self.planner.plan, self.facts()
        row = self.workers.row(worker_id) if row is None else row
        stage = row["stage"] if row is not None and row["state"] in ALIVE_STATES else -1
        out = {"stage": stage, "num_stages": len(plan), "next_address": "", "next_addresses": [], "next_ids": [],
               "member": False, "peer_ids": [], "peer_addresses": [], "peer_address_ids": [], "contributors": [],
               "checkpoint_writer": False, "standby_reason": "", "upstream_ids": [], "fetcher_ids": [],
               "peer_dht_ids": [], "verifier_ids": [], "attested_digests": [], "attested_position": 0}
        if stage < 0:
            out["standby_reason"] = facts.standby_why.get(worker_id, "")
            return out
        spec = plan[stage]
        out.update(start_layer=spec.start, end_layer=spec.end, embed=spec.embed, head=spec.head)
        workers, members = facts.by_stage, facts.members
        nxt = workers.get(stage + 1, [])
        serving = [w for w in nxt if w["id"] in members.get(stage + 1, [])] or nxt
        out["next_addresses"], out["next_ids"] = [w["address"] for w in serving], [w["id"] for w in serving]
        out["next_address"] = out["next_addresses"][0] if out["next_addresses"] else ""
        mine = members.get(stage, [])
        out["member"] = worker_id in mine
        out["peer_ids"] = list(mine)
        holders = [w for w in workers.get(stage, []) if w["id"] != worker_id and facts.is_holder(w)]
        out["peer_addresses"], out["peer_address_ids"] = [w["address"] for w in holders], [w["id"] for w in holders]
        position, by_stage = facts.attested
        layers, digests = by_stage.get(stage, ((-1, -1), ()))
        if holders and not facts.is_holder(row) and layers == (spec.start, spec.end):  # it copies: what to expect
            out["attested_position"], out["attested_digests"] = position, list(digests)
        # Who may call this worker's stage server: the previous stage's replicas send micro-batches,
        # this stage's replicas that do not hold the current state yet copy it.
        out["upstream_ids"] = [w["id"] for w in workers.get(stage - 1, [])]
        out["fetcher_ids"] = [w["id"] for w in workers.get(stage, [])
                              if w["id"] != worker_id and not facts.is_holder(w)]
        # Standbys spot-check a stage with no other replica (ledger/spot_checks.py): a standby with a
        # check of this worker's pending may fetch its evidence, no other (the bytes are the
        # previous stage's activations).
        out["verifier_ids"] = facts.verifiers_of.get(worker_id, [])
        out["contributors"] = facts.contributors.get(str(stage), [])
        out["checkpoint_writer"] = bool(mine) and worker_id == min(mine)
        out["peer_dht_ids"] = [peer for w in workers.get(stage, []) if w["id"] in mine
                               for peer in _dht_peer_ids(w["dht_maddrs"])]
        return out

    def links_to_measure(self, worker_id: str, row=None) -> list[tuple[str, str]]:
        """(address, worker id) of the stage servers whose link from this worker a plan needs."""
        row = self.workers.row(worker_id) if row is None else row
        if row is None or row["state"] not in ALIVE_STATES or not self.planner.scheduling():
            return []
        candidates = self.planner.link_candidates()
        if candidates and worker_id not in candidates:
            return []  # only candidates measure (Measurements.to_measure); checked before reading every address
        by_stage, rows = self._link_targets(candidates)
        return self.measurements.to_measure(row, by_stage, rows, candidates)

    def run_state(self, worker_id: str) -> dict:
        facts = self.facts()
        row = self.workers.row(worker_id)
        return {**facts.common, "assignment": self.assignment(worker_id, row),
                "measure_links": self.links_to_measure(worker_id, row), "drain": worker_id in facts.drains,
                "newest_check": facts.newest_check.get(worker_id, 0)}


def _dht_peer_ids(maddrs_json: str | None) -> list[str]:
    """The hivemind peer id in a worker's DHT multiaddrs ('/ip4/.../tcp/N/p2p/<id>'), once."""
    ids = []
    for maddr in json.loads(maddrs_json or "[]"):
        parts = maddr.split("/")
        if "p2p" in parts and parts.index("p2p") + 1 < len(parts) and parts[parts.index("p2p") + 1] not in ids:
            ids.append(parts[parts.index("p2p") + 1])
    return ids
