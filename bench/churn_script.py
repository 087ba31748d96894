"""A scripted churn replayed by the churn simulation, to hold it against a live loopback swarm.

bench churn's figures are only as good as its simulation, so the same small script runs both
ways (tests/integration/test_churn_agreement.py): workers with simulated devices join when the
run reaches a given step and are killed a given number of steps after they took a stage, once
as real processes around a real coordinator on loopback, once here in virtual time around the
same ledger code with the same run config. The triggers are the run's own steps, read from the
ledger here and from `gptjt status` there, so both runs follow the same script however long a
real process takes to start. The two ledgers must agree on the sequence of plans the steps ran
on and on the rollbacks (agreement_record).

Here: one site (loopback: 0.1 ms, 10 Gbit/s inside), each worker's device reported as
`gptjt-worker --simulate-device` reports it (worker/simulated_device.py), nobody leaves but by
the script, and a departure brings no newcomer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from coordinator.cost_model import Link, ModelShape, Network
from gptjt_core.config import RunConfig
from worker.simulated_device import SimulatedDevice

from .churn_settings import ChurnSettings
from .churn_sim import ChurnSimulation
from .churn_volunteers import MFU, DeviceClass, Volunteer

LAB = "lab"
LOOPBACK = Link(0.0001, 10.0)


@dataclass(frozen=True)
class ScriptedWorker:
    """One worker of the script: its simulated device, when it joins and when it dies."""
    name: str
    device: str  # TFLOPS:MEMORY_GB, as --simulate-device takes it
    join_at_step: int = 0  # joins once the run's step is at least this (0: at the start, in order)
    # vanishes (as SIGKILL does) once the run's step is this many past the step at which it was
    # first seen holding a stage; None: it stays
    killed_after_held_steps: int | None = None


class LabSite:
    """Every worker and the checkpoint store on one site, as on loopback."""
    names = [LAB]
    store_site = LAB

    def network(self) -> Network:
        return Network({}, inside=LOOPBACK)


class ScriptedSimulation(ChurnSimulation):
    """The churn simulation on a run config and a script instead of volunteers' sessions."""

    def __init__(self, run: RunConfig, shape: ModelShape, script: list[ScriptedWorker], directory: Path,
                 hours: float = 2.0):
        settings = ChurnSettings(workers=0, churn=False, hours=hours,
                                 heartbeat_interval_s=run.coordinator.heartbeat_interval_s,
                                 heartbeat_timeout_s=run.coordinator.heartbeat_timeout_s,
                                 micro_batches_per_replica=max(1, run.train.global_batch // run.train.micro_batch
                                                               // run.pipeline.replicas_per_stage),
                                 replan_every_s=run.scheduler.replan_every_s,
                                 # a SIGKILLed worker's Watch stream closes and the coordinator's
                                 # probe finds its port shut within a fraction of a second
                                 peer_detect_s=0.5)
        super().__init__(settings, directory, run=run, shape=shape, regions=LabSite())
        self.script = list(script)
        self.devices = {w.name: SimulatedDevice.parse(w.device) for w in script}
        self.joined: set[str] = set()
        self.killed: set[str] = set()
        self.held_since: dict[str, int] = {}  # name -> the step it was first seen holding a stage at
        self.ids: dict[str, str] = {}  # name -> the ledger's worker id

    @classmethod
    def of_run_file(cls, path: Path, script: list[ScriptedWorker], directory: Path) -> ScriptedSimulation:
        """The run config and model shape a coordinator started on `path` would have
        (coordinator/cli.py)."""
        from coordinator.scheduler import model_shape
        from gptjt_core.config import load_run_config
        from gptjt_core.model import model_config_for

        run = load_run_config(path)
        c = model_config_for(run.model.source)
        return cls(run, model_shape(c.n_layer, c.n_embd, c.n_inner or 4 * c.n_embd, c.vocab_size), script, directory)

    def run_sim(self):
        self._after_event()  # the workers that join at the start
        return super().run_sim()

    def _device(self, v: Volunteer) -> dict:
        d = self.devices[v.name]
        return {**d.device_info(self.run.train.precision), "block_tflops": d.tflops, "head_tflops": d.tflops}

    def _on_join(self, v: Volunteer) -> None:
        super()._on_join(v)
        self.ids[v.name] = next(w.id for w in self.workers.values() if w.volunteer.name == v.name
                                and not w.vanished)

    def _newcomer_after(self, worker_id: str) -> None:
        pass  # only the script brings workers

    def _after_event(self) -> None:
        step = self.ledger.step
        for w in self.script:
            if w.name not in self.joined and step >= w.join_at_step:
                self.joined.add(w.name)
                d = self.devices[w.name]
                device = DeviceClass("simulated", d.memory_gb, d.tflops / MFU, 0.0)
                self._at(self.clock.t + 0.01 * len(self.joined), "join",
                         Volunteer(w.name, device, LAB, 0.0, math.inf, 1.0))
            if w.killed_after_held_steps is None or w.name not in self.ids or w.name in self.killed:
                continue
            row = self.ledger.worker(self.ids[w.name])
            if w.name not in self.held_since and row is not None and row["stage"] >= 0:
                self.held_since[w.name] = step
            if w.name in self.held_since and step >= self.held_since[w.name] + w.killed_after_held_steps:
                self.killed.add(w.name)
                self._at(self.clock.t, "leave", self.ids[w.name])


def agreement_record(db) -> dict:
    """What the two runs must agree on, from a ledger's tables (an sqlite3 connection with rows
    by name): `plans`, the distinct plans consecutive steps opened on, each as ((start, end),
    worker names) per stage (a step restarted on the same plan shows once); `rollbacks`, for each
    rollback, the plan (by its index in `plans`) whose first step it went back to, or None when it
    went elsewhere; `dead`, who was declared dead, in order."""
    names = {r["id"]: r["name"] for r in db.execute("SELECT id, name FROM workers")}
    plans, opened_at, rollbacks, dead = [], [], [], []
    for r in db.execute("SELECT kind, detail FROM events WHERE kind IN ('step_open', 'rolled_back', 'worker_dead') "
                        "ORDER BY id"):
        if r["kind"] == "step_open":
            step = int(re.match(r"step (\d+)", r["detail"]).group(1))
            plan = tuple((int(a), int(b), tuple(sorted(names.get(i, i) for i in ids.split(", ") if i)))
                         for a, b, ids in re.findall(r"\(layers (\d+)-(\d+)\) on ([^;]*)", r["detail"]))
            if not plans or plans[-1] != plan:
                plans.append(plan)
                opened_at.append(step)
        elif r["kind"] == "rolled_back":
            target = int(re.search(r"rolled back to step (\d+)", r["detail"]).group(1))
            rollbacks.append(opened_at.index(target) if target in opened_at else None)
        else:
            dead.append(names.get(r["detail"].split(" ", 1)[0], "?"))
    return {"plans": plans, "rollbacks": rollbacks, "dead": dead}
