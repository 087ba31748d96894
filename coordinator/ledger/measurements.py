"""What workers measured: their device at the run's dtype, and links towards other stage servers;
and what the coordinator timed itself: each worker's averaging rate.

The scheduler's inputs. A measurement that moves by more than MOVED (20 %) is news: the caller
re-plans on it; jitter below that writes the figure and stays quiet.

Two rows of the links table are not links between stage servers, and no worker serves at
their addresses (scheduler.measured_pairs skips them): 'coordinator' (the heartbeat's round
trip) and AVERAGER, the payload rate of the averaging rounds the worker took part in, in
Mbit/s (cost_model.averaging_rate_gbps), each timed on the coordinator's clock from the step's
AVERAGING phase to its stage's last AVERAGED report. A worker's own report cannot make it look
faster than that; a slow peer in its group makes it look slower, and for a few rounds after.

The rate kept is smoothed: each round moves it halfway to the round's own, in ratio
(AVERAGING_SMOOTHING). One group's rounds varied 71-170 Mbit/s from round to round on 2 busy
cores (a calm chaos soak run by hand, 2026-12-07), so with the last round's rate kept most rounds
were news and searched for a plan. Halfway, a round 40 % faster than the kept rate moves it by
18 % (quiet) and one 40 % slower by 23 %, while a group whose rate halves for good moves it by
29 % on its first round: news at once. Under independent jitter the kept rate moves from round
to round by ~0.4 of what the last round's rate did (standard deviations, an exponential average
of weight 1/2: sqrt(1/3) against sqrt(2)).
"""

from __future__ import annotations

import json
import math
from itertools import chain

from gptjt_core.config import SchedulerConfig

from ..scheduler import LinkView
from .db import LedgerDB
from .events import EventLog
from .stored_values import stored_json

MOVED = 0.2  # relative change of a device rate or a link's bandwidth that counts as news
AVERAGER = "averager"  # the links row holding a worker's averaging rate (dst)
AVERAGING_SMOOTHING = 0.5  # the share of each round's rate in the kept one (1: the last round's alone)


class Measurements:
    """Device figures and link measurements workers report on heartbeats."""

    def __init__(self, db: LedgerDB, events: EventLog, scheduler: SchedulerConfig):
        self.db, self.events = db, events
        self.scheduler = scheduler  # probe_max_age_s, read at each use
        # The links table as the scheduler reads it, (src, dst) -> LinkView: read once, then kept in
        # step with the writes made here, and read again after a rollback (LedgerDB.rollbacks). Every
        # plan decision reads every link (~10^4 at 1,000 workers); reading them from SQLite was
        # ~15 % of bench churn's time.
        self._links: dict[tuple[str, str], LinkView] | None = None
        self._links_read_at = -1  # LedgerDB.rollbacks when _links was read

    def record(self, worker_id: str, row, device: dict | None, links: list[dict]) -> list[str]:
        """Store a re-measured device and links; returns what moved enough to re-plan on (and
        records it as a `measured` event)."""
        changed = []
        if device:
            before = stored_json(row["device"], {}, "workers.device")
            self.db.execute("UPDATE workers SET device=? WHERE id=?",
                            (json.dumps({**device, "at_run_dtype": True}), worker_id))
            old_rate = before.get("matmul_tflops", 0.0)
            if not before.get("at_run_dtype") or abs(device["matmul_tflops"] - old_rate) > MOVED * max(old_rate, 1e-12):
                changed.append(f"{worker_id} measured {device['matmul_tflops']:.4g} TFLOP/s at {device.get('dtype')}")
        for m in links:
            old = self.db.execute("SELECT mbit FROM links WHERE src=? AND dst=?", (worker_id, m["address"])).fetchone()
            self.db.execute("INSERT OR REPLACE INTO links VALUES(?, ?, ?, ?, ?)",
                            (worker_id, m["address"], m["latency_ms"], m["mbit"], m["measured_unix_s"]))
            self._remember(LinkView(worker_id, m["address"], float(m["latency_ms"]), float(m["mbit"])))
            if old is None or abs(m["mbit"] - old["mbit"]) > MOVED * old["mbit"]:
                changed.append(f"link {worker_id} -> {m['address']}: {m['mbit']:.4g} Mbit/s, "
                               f"{m['latency_ms']:.3g} ms")
        if changed:
            self.events.record("measured", "; ".join(changed))
        return changed

    def record_coordinator_rtt(self, worker_id: str, rtt_ms: float) -> None:
        """The worker's link to the coordinator (heartbeat round trip), kept with the links under
        the address 'coordinator'; rewritten only when it moves by half, so jitter writes nothing."""
        old = self.db.execute("SELECT latency_ms FROM links WHERE src=? AND dst='coordinator'", (worker_id,)).fetchone()
        if old is None or abs(rtt_ms / 2 - old["latency_ms"]) > 0.5 * old["latency_ms"]:
            self.db.execute("INSERT OR REPLACE INTO links VALUES(?, 'coordinator', ?, 0, ?)",
                            (worker_id, rtt_ms / 2, self.db.clock()))
            self._remember(LinkView(worker_id, "coordinator", float(rtt_ms / 2), 0.0))

    def record_averaging(self, worker_ids: list[str], gbps: float) -> list[str]:
        """A group's round at `gbps`, for each of its members: their kept rate moves toward it
        (smoothed_rate); returns what moved enough to re-plan on (and records it as a `measured` event)."""
        changed = []
        for worker_id in worker_ids:
            old = self.db.execute("SELECT mbit FROM links WHERE src=? AND dst=?", (worker_id, AVERAGER)).fetchone()
            kept = smoothed_rate(old["mbit"] if old is not None else None, gbps * 1e3)
            self.db.execute("INSERT OR REPLACE INTO links VALUES(?, ?, 0, ?, ?)",
                            (worker_id, AVERAGER, kept, self.db.clock()))
            self._remember(LinkView(worker_id, AVERAGER, 0.0, kept))
            if old is None or abs(kept - old["mbit"]) > MOVED * old["mbit"]:
                changed.append(f"{worker_id} averaged at {gbps * 1e3:.4g} Mbit/s (kept: {kept:.4g})")
        if changed:
            self.events.record("measured", "; ".join(changed) + f" (a round of {len(worker_ids)} replicas)")
        return changed

    def averaging_gbps(self) -> dict[str, float]:
        """worker id -> its kept averaging rate (smoothed_rate), Gbit/s (only those that averaged), from
        the links this process keeps (link_views): the planner's read."""
        return {v.src: v.mbit / 1e3 for v in self.link_views() if v.dst_address == AVERAGER and v.mbit > 0}

    def averaging_mbit_stored(self) -> dict[str, float]:
        """The same in Mbit/s, read from the ledger: the status process writes nothing, so the
        links it would keep are never brought up to date."""
        return {r["src"]: r["mbit"] for r in self.db.execute("SELECT src, mbit FROM links WHERE dst=?", (AVERAGER,))}

    def coordinator_latency_ms(self) -> dict[str, float]:
        return {r["src"]: r["latency_ms"] for r in self.db.execute("SELECT * FROM links WHERE dst='coordinator'")}

    def link_views(self) -> list[LinkView]:
        """Every stored link (those to 'coordinator' too: no worker serves there)."""
        if self._links is None or self._links_read_at != self.db.rollbacks:
            self._links = {(r["src"], r["dst"]): LinkView(r["src"], r["dst"], r["latency_ms"], r["mbit"])
                           for r in self.db.execute("SELECT src, dst, latency_ms, mbit FROM links")}
            self._links_read_at = self.db.rollbacks
        return list(self._links.values())

    def _remember(self, link: LinkView) -> None:
        if self._links is not None:  # last, as INSERT OR REPLACE puts the row last
            self._links.pop((link.src, link.dst_address), None)
            self._links[(link.src, link.dst_address)] = link

    def forget(self, worker_id: str) -> None:
        """Delete the links `worker_id` measured (its row is being pruned: ledger/retention.py)."""
        self.db.execute("DELETE FROM links WHERE src=?", (worker_id,))
        if self._links is not None:
            for key in [k for k in self._links if k[0] == worker_id]:
                del self._links[key]

    def to_measure(self, row, by_stage: dict[int, list], live: list, candidates: frozenset[str] = frozenset(),
                   limit: int = 8) -> list[tuple[str, str]]:
        """Stage addresses whose link from this worker a plan needs and nobody measured within
        scheduler.probe_max_age_s: the next stage's and its own stage's replicas first, then the
        other live workers (bounded: `limit` per request). `by_stage`, `live`: the live workers
        (id, address, stage), oldest first, or only the candidates among them
        (AssignmentView._link_targets); this scans only until `limit` are found.
        `candidates` (when not empty): the workers the last search could place; a search reads
        no other link, so only they are asked (AssignmentView.links_to_measure), and only
        towards each other (with thousands of volunteers, measuring every pair would be
        O(workers^2) probes and heartbeats)."""
        worker_id = row["id"]
        fresh = {r["dst"] for r in self.db.execute("SELECT dst FROM links WHERE src=? AND measured>?",
                                                   (worker_id, self.db.clock() - self.scheduler.probe_max_age_s))}
        near = (row["stage"] + 1, row["stage"])

        def at(stage: int):  # standby (-1) is not in by_stage
            return by_stage.get(stage, []) if stage >= 0 else (r for r in live if r["stage"] == stage)

        ranked = chain(at(near[0]), at(near[1]), (r for r in live if r["stage"] not in near))
        out = []
        for r in ranked:
            if r["id"] != worker_id and r["address"] not in fresh and (not candidates or r["id"] in candidates):
                out.append((r["address"], r["id"]))
                if len(out) == limit:
                    break
        return out

    def measured_workers(self) -> int:
        """Live workers whose device was measured at the run's dtype (reported after joining)."""
        # a ledger an older version wrote may hold anything in `device`: gptjt_json_field says NULL
        return self.db.execute("SELECT COUNT(*) FROM workers WHERE state IN ('loading', 'ready', 'standby') AND "
                               "gptjt_json_field(device, 'at_run_dtype') = 'true'").fetchone()[0]


def smoothed_rate(kept: float | None, measured: float) -> float:
    """The averaging rate to keep after a round at `measured` (any unit), given the one kept
    before (None: the first round): AVERAGING_SMOOTHING of the way there in ratio (a weighted
    geometric mean), so a round at half the rate and one at twice it cancel. A kept rate that is
    not a positive number (a row from before smoothing, or damaged) is replaced by the round's."""
    if kept is None or not kept > 0 or not math.isfinite(kept):
        return measured
    return kept ** (1.0 - AVERAGING_SMOOTHING) * measured ** AVERAGING_SMOOTHING
