"""The steps of bench churn's simulation: how long each takes, what its members report to the
real ledger, and what churn undoes (bench/churn_sim.py runs the events around them).

A step's time is the cost model's prediction for its members on the true links
(coordinator/cost_model.py predict_step), plus at a checkpoint step the slowest stage's upload
to the store. When it is up, its members report as real workers do: stage 0's replicas lease
and commit every ticket, then every member reports its contribution, averaged sums (when the
step averages), the checkpoint of its stage (at a checkpoint step) and its applied digest.
"""

from __future__ import annotations

from coordinator.cost_model import Device, StagePlacement, predict_step, stage_params

TOKENS_LOSS = 2.5  # the loss each committed micro-batch reports (the simulation trains nothing)


class SimulatedSteps:
    """The step half of ChurnSimulation (a mixin: it reads the simulation's ledger, clock,
    workers and settings, and keeps `running`, `blocked`, `started_at` and `closed`)."""

    def _track_progress(self) -> None:
        """Steps undone by a rollback, and an attempt in progress that was restarted, are lost."""
        ledger = self.ledger
        undone = [s for s in self.closed if s >= ledger.step]
        if undone:
            self.result.rollbacks += 1
            self.result.rolled_back_s += sum(self.closed.pop(s) for s in undone)
        if self.running is not None and (self.running != (ledger.step, ledger.attempt, ledger.restore_epoch)
                                         or ledger.phase not in ("open", "accumulated", "averaging", "applying")):
            self.result.rolled_back_s += self.clock.t - self.started_at  # the attempt was restarted
            self.running, self.blocked = None, False

    def _start_step(self) -> None:
        ledger = self.ledger
        members = ledger.state.members()
        devices, placements, ids = [], [], {}
        for stage, spec in enumerate(ledger.plan):
            group = []
            for worker_id in members.get(stage, []):
                ids[worker_id] = len(devices)
                v = self.workers[worker_id].volunteer
                devices.append(Device(worker_id, v.tflops, v.device.memory_gb, v.site))
                group.append(ids[worker_id])
            placements.append(StagePlacement(spec.start, spec.end, tuple(group)))
        seconds = predict_step(placements, devices, self.net, self.shape, self.work).step_s
        if (ledger.step + 1) % self.run.train.checkpoint_every == 0:
            # each stage's writer uploads (its smallest member id, as the ledger's assignments say)
            seconds += max(stage_params(self.shape, p.start, p.end) * self.s.checkpoint_bytes_per_param * 8
                           / (self.net.site_link(devices[ids[min(members[i])]].site, self.regions.store_site).gbps
                              * 1e9) for i, p in enumerate(placements))
        self.running, self.blocked = (ledger.step, ledger.attempt, ledger.restore_epoch), False
        self.started_at = self.clock.t
        counts = len(ledger.plan)
        if not self.result.stage_counts or self.result.stage_counts[-1] != counts:
            self.result.stage_counts.append(counts)
        self._at(self.clock.t + seconds, "step_done", self.running)

    def _on_step_done(self, key: tuple) -> None:
        ledger = self.ledger
        if key != self.running or key != (ledger.step, ledger.attempt, ledger.restore_epoch):
            return
        members = ledger.state.members()
        if any(self.workers[w].vanished for ids in members.values() for w in ids):
            self.blocked = True  # it waits for the death to be noticed: then it restarts or goes on
            return
        step, attempt, _ = key
        per_member = self._commit_tickets(members.get(0, []), step)
        total = sum(per_member.values())
        for stage, ids in members.items():
            share = _shares(total, ids) if stage else per_member
            for w in ids:
                self._call(ledger.report, w, step, attempt, "contribution", 1.0, share[w])
        if ledger.phase == "averaging":
            for stage, ids in members.items():
                for w in ids:
                    self._call(ledger.report, w, step, attempt, "averaged", float(len(ids)), group_weight=total)
        if (step + 1) % self.run.train.checkpoint_every == 0 and ledger.phase == "applying":
            for stage, spec in enumerate(ledger.plan):
                writer = min(members[stage])  # assignments.py: checkpoint_writer
                if not self._call(ledger.checkpoint_refusal, writer, step + 1, spec):
                    self._call(ledger.record_checkpoint, step + 1, spec, f"store/{step + 1}/{spec.start}-{spec.end}")
        for stage, ids in members.items():
            for w in ids:
                self._call(ledger.report, w, step, attempt, "applied", digest=f"{stage}-{step}")
        if ledger.step == step + 1:
            self.closed[step] = self.clock.t - self.started_at
            for ids in members.values():
                for w in ids:
                    self.workers[w].held_step = step + 1  # its state is at the next step now
        self.running, self.blocked = None, False

    def _commit_tickets(self, stage0: list[str], step: int) -> dict[str, int]:
        counts = {w: 0 for w in stage0}
        tokens = self.run.train.micro_batch * self.run.train.seq_len
        leased = True
        while leased:
            leased = False
            for w in stage0:
                tickets, _ = self._call(self.ledger.lease, w, self.s.micro_batches_per_replica)
                for t in tickets:
                    if self._call(self.ledger.commit, w, t.id, t.attempt, TOKENS_LOSS, tokens) == "committed":
                        counts[w] += 1
                leased = leased or bool(tickets)
        return counts


def _shares(total: int, ids: list[str]) -> dict[str, int]:
    """`total` micro-batches dealt over a stage's replicas (each passed through exactly one)."""
    return {w: total // len(ids) + (i < total % len(ids)) for i, w in enumerate(ids)}
