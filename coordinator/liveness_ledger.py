"""The ledger's side of liveness: gather a phase's facts, apply the remedy liveness.judge names.

A mixin of RunLedger (state.py). Its facts: when the phase began (meta phase_since), the
members' reports, leased tickets and the last commit, the causes replicas reported for failed
averaging rounds, and how often this step was already restarted for being stuck. Every stall
becomes a `step_stuck` event naming the cause and the remedy, and `status()["liveness"]`.
"""

from __future__ import annotations

import json

from . import liveness
from .liveness import DROP_WORKERS, REDUCE_REPLICAS, RESTART_STEP, Limits, PhaseFacts, Stall

_REPORT_OF_PHASE = {"accumulated": "contribution", "averaging": "averaged", "applying": "applied"}


class LivenessMixin:
    """Needs from RunLedger: db, run, clock, step, attempt, phase, paused, _meta, _set_meta,
    _set_phase, _event, _tx, _worker, _members, _set_members, _drop_worker, _restart_step,
    _maybe_open, _set_meta('plan_version')."""

    # -- facts -------------------------------------------------------------------------
    def _limits(self) -> Limits:
        c, a = self.run.coordinator, self.run.averaging
        return Limits(c.phase_timeout_s, 3 * a.timeout_s, c.max_stall_restarts, a.max_restarts)

    def _stall_restarts(self, phase: str) -> int:
        counts = json.loads(self._meta("stall_restarts") or "{}")
        return counts.get(phase, 0) if counts.get("step") == self.step else 0

    def _count_stall_restart(self, phase: str) -> None:
        counts = json.loads(self._meta("stall_restarts") or "{}")
        if counts.get("step") != self.step:
            counts = {"step": self.step}
        counts[phase] = counts.get(phase, 0) + 1
        self._set_meta("stall_restarts", json.dumps(counts))

    def _averaging_causes(self) -> dict:
        """{worker: {"detail", "rounds"}} reported for the current (step, attempt)."""
        saved = json.loads(self._meta("averaging_causes") or "{}")
        return saved.get("workers", {}) if saved.get("key") == [self.step, self.attempt] else {}

    def _phase_facts(self) -> PhaseFacts | None:
        phase = self.phase
        if phase not in ("open", "accumulated", "averaging", "applying"):
            return None
        now = self.clock()
        since = float(self._meta("phase_since") or now)
        step, attempt = self.step, self.attempt
        kind = _REPORT_OF_PHASE.get(phase)
        reported = {r[0] for r in self.db.execute("SELECT worker FROM reports WHERE step=? AND attempt=? AND kind=?",
                                                  (step, attempt, kind))} if kind else set()
        leases, progress = {}, since
        if phase == "open":
            leases = dict(self.db.execute("SELECT worker, COUNT(*) FROM tickets WHERE step=? AND attempt=? AND "
                                          "state='leased' GROUP BY worker", (step, attempt)).fetchall())
            last = self.db.execute("SELECT MAX(committed_at) FROM tickets WHERE step=? AND attempt=?",
                                   (step, attempt)).fetchone()[0]
            progress = max(since, last or 0.0)
        return PhaseFacts(phase, now - since, now - progress, self.paused, self._members(), reported, leases,
                          self._stall_restarts(phase),
                          {w: f"{c['detail']} ({c['rounds']} round(s))" for w, c in self._averaging_causes().items()})

    # -- judging -----------------------------------------------------------------------
    def _judge_liveness(self) -> Stall | None:
        """Called by the reaper: apply the remedy if the current phase is past its deadline."""
        facts = self._phase_facts()
        if facts is None:
            return None
        limits = self._limits()
        stall = liveness.judge(facts, limits)
        if stall is not None:
            with self._tx():
                self._apply_stall(stall, facts, limits)
        return stall

    def _apply_stall(self, stall: Stall, facts: PhaseFacts, limits: Limits) -> None:
        step, attempt = self.step, self.attempt
        remedy = liveness.remedy_text(stall, facts.restarts, limits)
        self._event("step_stuck", f"step {step} attempt {attempt} stuck in {stall.phase}: {stall.cause}; "
                    f"remedy: {remedy}")
        self._set_meta("last_stall", json.dumps({"step": step, "attempt": attempt, "phase": stall.phase,
                                                 "cause": stall.cause, "remedy": remedy, "at": self.clock()}))
        if stall.remedy == RESTART_STEP:
            self._count_stall_restart(stall.phase)
            self._restart_step(f"stuck in {stall.phase}: {stall.cause}")
            self._set_phase("waiting")
            self._maybe_open()
        elif stall.remedy == DROP_WORKERS:
            for worker_id in stall.workers:
                row = self._worker(worker_id)
                if row is not None:
                    self._event("worker_stuck", f"{worker_id} ({row['name']}), stage {row['stage']}: stuck in "
                                f"{stall.phase} of step {step}")
                    self._drop_worker(worker_id, "dead", "worker_dead")
        elif stall.remedy == REDUCE_REPLICAS:
            self._reduce_to_one_replica(stall.stages)
            self._restart_step(f"stage(s) {', '.join(map(str, stall.stages))} fall back to one replica: "
                               f"{stall.cause}")
            self._set_phase("waiting")
            self._maybe_open()

    def _reduce_to_one_replica(self, stages: tuple[int, ...]) -> None:
        """Keep each stage's checkpoint writer (its smallest member id); hold the others out of the
        stage for averaging.fallback_steps steps. They stay live, on standby."""
        members = self._members()
        holds = self.held_out()
        until = self.step + self.run.averaging.fallback_steps
        for stage in stages:
            ids = sorted(members.get(stage, []))
            for worker_id in ids[1:]:
                self.db.execute("UPDATE workers SET stage=-1, state='standby', loaded_epoch=-1, position=-1 "
                                "WHERE id=?", (worker_id,))
                holds[worker_id] = until
            members[stage] = ids[:1]
            self._event("replicas_reduced", f"stage {stage} continues with replica {ids[0] if ids else '-'} alone; "
                        f"{', '.join(ids[1:]) or 'nobody'} held out of it until step {until}")
        self._set_members(members)
        self._set_meta("held_out", json.dumps(holds))
        self._set_meta("plan_version", self.plan_version + 1)

    # -- holds -------------------------------------------------------------------------
    def held_out(self) -> dict[str, int]:
        """Workers kept out of stages by an averaging fallback: id -> the step their hold ends."""
        return json.loads(self._meta("held_out") or "{}")

    def _expire_holds(self) -> bool:
        """Drop holds that ended by the current step; True if any did (the caller re-plans)."""
        holds = self.held_out()
        kept = {w: until for w, until in holds.items() if until > self.step}
        if kept != holds:
            self._set_meta("held_out", json.dumps(kept))
        return len(kept) != len(holds)

    # -- reports -----------------------------------------------------------------------
    def averaging_failed(self, worker_id: str, step: int, attempt: int, detail: str) -> bool:
        """A member replica's averaging round failed: keep its cause for the stall diagnosis, and
        an event for the first failure of each replica in each attempt (not one per retry)."""
        row = self._worker(worker_id)
        if (row is None or row["stage"] < 0 or (step, attempt) != (self.step, self.attempt)
                or self.phase != "averaging" or worker_id not in self._members().get(row["stage"], [])):
            return False
        saved = json.loads(self._meta("averaging_causes") or "{}")
        if saved.get("key") != [step, attempt]:
            saved = {"key": [step, attempt], "workers": {}}
        first = worker_id not in saved["workers"]
        rounds = saved["workers"].get(worker_id, {}).get("rounds", 0) + 1
        saved["workers"][worker_id] = {"detail": detail or "no cause given", "rounds": rounds}
        with self._tx():
            self._set_meta("averaging_causes", json.dumps(saved))
            if first:
                self._event("averaging_failed", f"step {step} attempt {attempt}: stage {row['stage']} replica "
                            f"{worker_id} ({row['name']}): {detail or 'no cause given'}")
        return True

    # -- status ------------------------------------------------------------------------
    def liveness_status(self) -> dict:
        """The `liveness` object of the status JSON."""
        since = self._meta("phase_since")
        phase, limits = self.phase, self._limits()
        deadline = {"open": limits.phase_timeout_s, "accumulated": limits.phase_timeout_s,
                    "applying": limits.phase_timeout_s, "averaging": limits.averaging_timeout_s}.get(phase)
        last = self._meta("last_stall")
        counts = json.loads(self._meta("stall_restarts") or "{}")
        return {"phase_since": float(since) if since else None,
                "phase_age_s": round(self.clock() - float(since), 3) if since else None,
                "deadline_s": deadline,
                "stall_restarts": {k: v for k, v in counts.items() if k != "step"} if counts.get("step") == self.step
                else {},
                "last_stall": json.loads(last) if last else None,
                "held_out": self.held_out(),
                "averaging_failures": self._averaging_causes()}
