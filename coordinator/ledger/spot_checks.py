"""Spot checks: which micro-batches a replica recomputes, who recomputes them, and the verdicts.

When a member's CONTRIBUTION arrives with its commitments, each of its micro-batches is drawn for
a check with probability verify.sample_rate (the first verify.first_checks of every worker
always), from the operating system's random source: the draw happens after the commitment is in,
and no worker can predict it. A drawn micro-batch is handed to another member of the same stage
(the verifier, at random) with its next heartbeat reply; the verifier recomputes it with the same
weights and answers with its own commitment (worker/spot_check.py). The coordinator compares the
two with the tolerance of their precisions (gptjt_core.commitment.compare) and records:

  agree      the recomputation matches the claim within the tolerance
  disagree   it does not: an event names the worker, the verifier and the evidence
  unchecked  the verifier could not recompute (evidence refused or inconsistent, weights gone)
  stale      nobody answered before the verifier's weights of that step were gone, or before
             the run ended

A stage with no other member is checked by a standby worker instead, with weights from the
checkpoint store: only on steps whose weights the store holds (a checkpoint of that step; step 0:
the model source), at sample_rate x train.checkpoint_every there (at most 1), so that the share of
micro-batches checked stays about sample_rate. Its third opinion comes from another standby.

A disagreement is evidence, not yet a sentence: one of the two is wrong. It draws a third
opinion, the same check handed to a third member of that step's stage (with two replicas there is
none, and the dispute stays open, named in an event). The third's answer out-votes one side: if
its recomputation reproduces the claim, the first verifier was wrong; if not, the checked worker
was. `answer` returns whom, and the ledger quarantines it (coordinator/ledger/recovery.py).
Until a third opinion settles it (it may come too late: the step's weights are gone, and it is
stale), both sides of the dispute have verify.dispute_checks of each contribution drawn, so the
next disagreement, with a third opinion in time, comes a step later, not at the sample rate.
Rows live in the `checks` table (kind 'recompute') beside the chain checks; agreements are pruned
with them, the rest kept for the run; the counters are meta values, so the status costs the
same on a long run.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable
from typing import NamedTuple

from gptjt_core.commitment import Commitment, compare, tolerance_for
from gptjt_core.config import RunConfig
from gptjt_core.stage_spec import StageSpec
from gptjt_core.verify_config import STANDBY_EVIDENCE_STEPS

from .checkpoints import CheckpointIndex
from .db import LedgerDB
from .events import EventLog

KIND = "recompute"
PENDING, AGREE, DISAGREE, UNCHECKED, STALE = "pending", "agree", "disagree", "unchecked", "stale"
STORE, SOURCE = "store", "source"  # where a standby verifier takes the weights of the checked step
COUNTERS = ("spot_checks", "spot_agree", "spot_disagree", "spot_unchecked", "spot_stale")


class Outvoted(NamedTuple):
    """A worker two recomputations agree against: quarantine it."""

    worker: str
    evidence: str  # the checks and their verdicts, for the event


def precision_of(requested: str, device_json: str | None) -> str:
    """The precision a worker computes in, from the run's train.precision and the device it
    reported at join ('auto' is fp32 on a CPU, reduced on a GPU: gptjt_core.precision)."""
    if requested in ("fp32", "bf16", "fp16"):
        return requested
    try:
        kind = json.loads(device_json or "{}").get("kind", "")
    except ValueError:
        kind = ""
    return "fp32" if kind == "cpu" else "bf16"


class SpotCheckBook:
    """Draws spot checks, hands them to verifiers and judges their answers."""

    def __init__(self, db: LedgerDB, events: EventLog, run: RunConfig, rng: random.Random | None = None,
                 checkpoints: CheckpointIndex | None = None, plan: Callable[[], list[StageSpec]] | None = None):
        """checkpoints and plan (the stage specs in force) let standbys check single-replica
        stages; without them (a read-only view) nothing is drawn for those."""
        self.db, self.events, self.run = db, events, run
        self.rng = rng or random.SystemRandom()  # tests pass a seeded one
        self.checkpoints, self.plan = checkpoints, plan

    # -- drawing -------------------------------------------------------------------------
    def draw(self, step: int, attempt: int, stage: int, worker_id: str, tickets: list[int],
             members: list[str], epoch: int) -> int:
        """Checks of `worker_id`'s micro-batches `tickets` of (step, attempt), each given to
        another member of its stage or, when it has none, to a standby that loads the stage's
        weights of `step` (only if the store or the model source holds them); returns how many
        were drawn."""
        cfg = self.run.verify
        if not tickets or (cfg.sample_rate <= 0 and cfg.first_checks <= 0) \
                or self.run.averaging.mode == "local-steps":  # replicas' weights differ between outer steps
            return 0
        verifiers, weights, rate = [m for m in members if m != worker_id], None, cfg.sample_rate
        if not verifiers:
            weights = self._weights_at(step, stage)
            verifiers = [r["id"] for r in self.db.execute("SELECT id FROM workers WHERE state='standby' AND stage=-1")
                         ] if weights else []
            rate = min(1.0, cfg.sample_rate * max(1, self.run.train.checkpoint_every))
        if not verifiers:
            return 0
        done = self.db.execute("SELECT COUNT(*) FROM checks WHERE kind=? AND worker=?", (KIND, worker_id)).fetchone()[0]
        # which of the tickets a disputed worker has checked whatever the rate: drawn at random, like the rest
        disputed = set(self.rng.sample(range(len(tickets)), min(cfg.dispute_checks, len(tickets)))) \
            if cfg.dispute_checks and self.in_unsettled_dispute(worker_id) else set()
        drawn = 0
        for i, ticket in enumerate(tickets):
            if done + drawn < cfg.first_checks or i in disputed or self.rng.random() < rate:
                verifier = self.rng.choice(verifiers)
                self.db.execute("INSERT INTO checks(step, attempt, ticket, stage, kind, verdict, worker, peers, "
                                "detail, epoch, weights) VALUES(?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                                (step, attempt, ticket, stage, KIND, PENDING, worker_id, json.dumps([verifier]), epoch,
                                 weights))
                drawn += 1
        self._count("spot_checks", drawn)
        return drawn

    def in_unsettled_dispute(self, worker_id: str) -> bool:
        """Whether `worker_id` is either side of a disagreement whose third opinion was asked and
        has not settled it (pending, stale or unchecked), with neither side quarantined since.
        A dispute no third could be asked for (two replicas, no spare standby) is not counted:
        checking its sides again would only repeat it."""
        return self.db.execute(
            "SELECT 1 FROM checks d WHERE d.kind=? AND d.verdict=? AND d.opinion_of IS NULL "
            "AND (d.worker=? OR d.peers=?) "
            "AND EXISTS (SELECT 1 FROM checks t WHERE t.opinion_of=d.id) "
            "AND NOT EXISTS (SELECT 1 FROM checks t WHERE t.opinion_of=d.id AND t.verdict IN (?, ?)) "
            # peers holds the accuser as a JSON list of one (json.dumps([id])); ids are hex, nothing to escape
            "AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.state='quarantined' "
            "AND (w.id=d.worker OR d.peers='[\"' || w.id || '\"]')) LIMIT 1",
            (KIND, DISAGREE, worker_id, json.dumps([worker_id]), AGREE, DISAGREE)).fetchone() is not None

    def _weights_at(self, step: int, stage: int) -> str | None:
        """Where a standby finds the weights stage `stage` computed step `step` with: the store's
        checkpoint of `step` (written before the step opened: the step before it closes only once
        every stage is stored), the model source at step 0, else nowhere (None)."""
        if self.checkpoints is None or self.plan is None or stage >= len(self.plan()):
            return None
        if self.checkpoints.covers(step, self.plan()[stage]):
            return STORE
        return SOURCE if step == 0 else None

    # -- handing out -----------------------------------------------------------------------
    def pending_for(self, verifier: str, epoch: int) -> list[dict]:
        """The checks of restore epoch `epoch` waiting for `verifier` (at most verify.max_pending),
        with what the checked worker claimed, where its stage server is, where the verifier takes
        the weights ('weights': None its own, 'store', 'source'), the stage's layers ('spec') and
        the attempt's loss scale ('loss_scale': None or 0 unscaled; ledger/loss_scaling.py).
        Within an epoch a stage's layer range stays what it was when the micro-batch was computed."""
        rows = self.db.execute(
            "SELECT c.id, c.step, c.attempt, c.ticket, c.stage, c.worker, c.weights, w.address, m.blob, m.returned, "
            "s.scale AS loss_scale "
            "FROM checks c JOIN commitments m ON m.step=c.step AND m.attempt=c.attempt AND m.ticket=c.ticket "
            "AND m.stage=c.stage AND m.worker=c.worker LEFT JOIN workers w ON w.id=c.worker "
            "LEFT JOIN loss_scales s ON s.step=c.step AND s.attempt=c.attempt "
            "WHERE c.verdict=? AND c.peers=? AND c.epoch=? ORDER BY c.id LIMIT ?",
            (PENDING, json.dumps([verifier]), epoch, self.run.verify.max_pending)).fetchall()
        plan = self.plan() if self.plan is not None else []
        return [{**dict(r), "spec": plan[r["stage"]] if r["stage"] < len(plan) else None} for r in rows]

    # -- judging ---------------------------------------------------------------------------
    def answer(self, verifier: str, check_id: int, recomputed: Commitment | None,
               unable: str) -> tuple[str, Outvoted | None]:
        """Judge a verifier's answer: (its verdict, whom it out-votes if it settles a dispute). An
        answer to a check that is not this verifier's, or no longer pending, changes nothing and
        says 'stale'."""
        row = self.db.execute("SELECT * FROM checks WHERE id=? AND kind=?", (check_id, KIND)).fetchone()
        if row is None or row["verdict"] != PENDING or json.loads(row["peers"]) != [verifier]:
            return STALE, None
        claimed_row = self.db.execute("SELECT blob FROM commitments WHERE step=? AND attempt=? AND ticket=? AND "
                                      "stage=? AND worker=?", (row["step"], row["attempt"], row["ticket"],
                                                               row["stage"], row["worker"])).fetchone()
        if claimed_row is None:
            return self._settle(row, STALE, "the claimed commitment was pruned before the answer came"), None
        if recomputed is None:
            verdict = self._settle(row, UNCHECKED, f"{verifier} could not recompute: {unable or 'no reason given'}")
            return verdict, self._resolve(row, verdict)
        tolerance = tolerance_for(self._precision(row["worker"]), self._precision(verifier))
        verdict = compare(Commitment.from_bytes(claimed_row["blob"]), recomputed, tolerance)
        if verdict.agrees:
            self._verified(row)
            return self._settle(row, AGREE, verdict.reason), self._resolve(row, AGREE)
        self.events.record("spot_check_failed", f"step {row['step']} attempt {row['attempt']} ticket {row['ticket']}, "
                           f"stage {row['stage']}: {row['worker']}'s work recomputed by {verifier} "
                           f"{verdict.reason}")
        self._settle(row, DISAGREE, verdict.reason)
        if row["opinion_of"] is None:
            self._ask_a_third(row, verifier)
        return DISAGREE, self._resolve(row, DISAGREE)

    def _ask_a_third(self, row: sqlite3.Row, verifier: str) -> None:
        """The same check, for a member of that step's stage that is neither side of the dispute."""
        if row["weights"] is None:
            candidates = [r[0] for r in self.db.execute(
                "SELECT worker FROM reports WHERE step=? AND attempt=? AND stage=? AND kind='contribution'",
                (row["step"], row["attempt"], row["stage"]))]
            alive = {r[0] for r in self.db.execute("SELECT id FROM workers WHERE state IN ('ready', 'draining')")}
        else:  # a store check: another standby loads the same weights
            candidates = [r[0] for r in self.db.execute("SELECT id FROM workers WHERE state='standby' AND stage=-1")]
            alive = set(candidates)
        thirds = sorted(m for m in candidates if m in alive and m not in (row["worker"], verifier))
        if not thirds:
            self.events.record("spot_check_disputed", f"check {row['id']}: {row['worker']} and {verifier} disagree "
                               f"about ticket {row['ticket']} of step {row['step']} and stage {row['stage']} has no "
                               f"third {'member' if row['weights'] is None else 'standby'} to settle it; nobody is "
                               "quarantined")
            return
        third = self.rng.choice(thirds)
        self.db.execute("INSERT INTO checks(step, attempt, ticket, stage, kind, verdict, worker, peers, detail, "
                        "opinion_of, epoch, weights) VALUES(?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?)",
                        (row["step"], row["attempt"], row["ticket"], row["stage"], KIND, PENDING, row["worker"],
                         json.dumps([third]), row["id"], row["epoch"], row["weights"]))
        self._count("spot_checks", 1)

    def _resolve(self, row: sqlite3.Row, verdict: str) -> Outvoted | None:
        """A third opinion's verdict settles the dispute it was asked about."""
        if row["opinion_of"] is None or verdict not in (AGREE, DISAGREE):
            return None
        first = self.db.execute("SELECT * FROM checks WHERE id=?", (row["opinion_of"],)).fetchone()
        (accuser,) = json.loads(first["peers"])
        (third,) = json.loads(row["peers"])
        loser = accuser if verdict == AGREE else row["worker"]
        return Outvoted(loser, f"ticket {row['ticket']} of step {row['step']}, stage {row['stage']}: {row['worker']} "
                               f"claimed it, {accuser} recomputed it and disagreed (check {first['id']}), {third} "
                               f"recomputed it and {'agreed with the claim' if verdict == AGREE else 'disagreed too'} "
                               f"(check {row['id']})")

    def expire(self, closed_step: int, epoch: int) -> int:
        """At the close of `closed_step`: checks of earlier steps still pending can no longer be
        made (a verifier keeps the weights of the step before its last update only), nor can
        those of an earlier restore epoch (the stages reloaded, perhaps with other layers)."""
        stale = self.db.execute(  # a standby's check: the checked stage keeps STANDBY_EVIDENCE_STEPS of evidence
            "UPDATE checks SET verdict=?, detail=? WHERE kind=? AND verdict=? AND (epoch IS NOT ? OR "
            "(weights IS NULL AND step < ?) OR (weights IS NOT NULL AND step <= ? - ?))",
            (STALE, "no answer before the weights or the evidence of the step were gone", KIND, PENDING, epoch,
             closed_step, closed_step, STANDBY_EVIDENCE_STEPS)).rowcount
        self._count("spot_stale", stale)
        return stale

    def end_of_run(self) -> int:
        """The run is done: checks still pending will not be answered (workers leave, and a late
        verdict must not quarantine anyone or roll back a finished run). They are stale, counted
        as such, and the run's record of checks is final."""
        stale = self.db.execute("UPDATE checks SET verdict=?, detail=? WHERE kind=? AND verdict=?",
                                (STALE, "the run ended before it was answered", KIND, PENDING)).rowcount
        self._count("spot_stale", stale)
        return stale

    def _verified(self, row: sqlite3.Row) -> None:
        """The checked micro-batch's tokens count as verified at its stage (once, however many
        checks of it agreed); a rollback forgets them with the steps it undoes (StepHistory)."""
        self.db.execute("INSERT OR IGNORE INTO verified_work(step, stage, ticket, tokens) "
                        "SELECT ?, ?, id, COALESCE(tokens, 0) FROM tickets WHERE id=?",
                        (row["step"], row["stage"], row["ticket"]))

    def counts(self) -> dict[str, int | float]:
        """The counters, the quarantined workers, and the verified work: `spot_verified_tokens`
        sums the tokens of every (micro-batch, stage) of a closed step that a spot check
        recomputed and agreed with;
        `spot_verified_fraction` divides it by the work of the run's closed steps, each step's
        tokens once per stage that took part in it (a token passes every stage, and each stage's
        work is checked on its own)."""
        quarantined = self.db.execute("SELECT COUNT(*) FROM workers WHERE state='quarantined'").fetchone()[0]
        verified = self.db.execute("SELECT COALESCE(SUM(v.tokens), 0) FROM verified_work v JOIN steps s "
                                   "ON s.step = v.step").fetchone()[0]  # closed steps only, like the work
        work = self.db.execute(  # a detail an older or damaged ledger holds counts as one stage
            "SELECT COALESCE(SUM(tokens * MAX(1, COALESCE(gptjt_json_object_size(detail), 1))), 0) FROM steps"
        ).fetchone()[0]
        return {**{name: int(self.db.meta(f"verification_{name}") or 0) for name in COUNTERS},
                "quarantined": quarantined, "spot_verified_tokens": verified,
                "spot_verified_fraction": min(1.0, verified / work) if work else 0.0}

    def _settle(self, row: sqlite3.Row, verdict: str, detail: str) -> str:
        self.db.execute("UPDATE checks SET verdict=?, detail=? WHERE id=?", (verdict, detail[:1000], row["id"]))
        self._count(f"spot_{verdict}", 1)
        return verdict

    def _precision(self, worker_id: str) -> str:
        row = self.db.execute("SELECT device FROM workers WHERE id=?", (worker_id,)).fetchone()
        return precision_of(self.run.train.precision, row["device"] if row is not None else None)

    def _count(self, name: str, n: int) -> None:
        if n:
            key = f"verification_{name}"
            self.db.set_meta(key, int(self.db.meta(key) or 0) + n)
